"""Where stream records live: `memory` (this process, the default) or, with
`REDIS_URL` set, `redis` (shared by every replica). Both offer the same
handful of calls to the gateway; a refusal names its HTTP status."""


class Refused(Exception):
    """A store cannot take a stream now: the status and error type to answer with."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
