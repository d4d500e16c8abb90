"""Local infrastructure: real servers for the local stack and tests, and deployment descriptors."""
