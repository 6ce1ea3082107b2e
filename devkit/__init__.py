"""Shared by tests, benchmarks and load tests: local TorchServe and KServe servers on free loopback
ports, camera-sized photos, the hostile request corpus. Not part of any archive."""
