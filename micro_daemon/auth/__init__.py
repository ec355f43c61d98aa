"""The auth building block: accounts, RS256 access tokens, refresh tokens and rules, per namespace."""
