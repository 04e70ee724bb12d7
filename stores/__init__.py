"""Where stream records live: `memory` (this process, the default) or, with
`REDIS_URL` set, shared by every replica."""
