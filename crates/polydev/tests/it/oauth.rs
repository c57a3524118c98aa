//! OAuth 2.1 for /mcp.
