"""The user tools: archiver, explain client, gRPC client (console entry points gradcam-*)."""
