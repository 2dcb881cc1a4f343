"""Real services the tests run against: docker-registry instances and the busybox base image."""
