"""Why a bot connection ends: the close codes on the wire and the reasons in metrics.

Standard codes come from websockets' :class:`~websockets.frames.CloseCode`;
4000-4999 are ours (docs/PROTOCOL.md, "Close codes"). :class:`CloseReason` is
the ``reason`` label of ``connections_closed_total``: a fixed set, so the
metric's cardinality is known before the first bot connects.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from websockets.asyncio.connection import Connection
from websockets.frames import CloseCode


class GatewayCloseCode(IntEnum):
    """Close codes of our own (the 4000-4999 range is for applications)."""

    BAD_REQUEST = 4400
    FORBIDDEN = 4403
    HANDSHAKE_TIMEOUT = 4408
    REPLACED = 4409
    IDLE = 4410
    TOO_SLOW = 4429


class CloseReason(StrEnum):
    """Why the gateway counts a connection as closed (``connections_closed_total{reason}``)."""

    BOT_LEFT = "bot_left"
    BAD_PATH = "bad_path"
    BAD_BOT_ID = "bad_bot_id"
    NO_BOT_ID = "no_bot_id"
    BOT_ID_MISMATCH = "bot_id_mismatch"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    REPLACED = "replaced"
    SHUTDOWN = "shutdown"
    TOO_SLOW = "too_slow"
    IDLE = "idle"
    MESSAGE_TOO_BIG = "message_too_big"
    WRONG_BOT = "wrong_bot"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    ERROR = "error"
    #: Kept sending over its rate or byte budget after a whole burst was dropped (1008).
    POLICY_VIOLATION = "policy_violation"
    #: Did not read what we wrote (pongs, commands) past --ws-write-buffer-max-bytes.
    WRITE_BUFFER_FULL = "write_buffer_full"


#: Close codes that say why a connection ended better than how its handler left.
REASON_OF_CODE: dict[int, CloseReason] = {
    GatewayCloseCode.REPLACED: CloseReason.REPLACED,
    CloseCode.SERVICE_RESTART: CloseReason.SHUTDOWN,
    CloseCode.MESSAGE_TOO_BIG: CloseReason.MESSAGE_TOO_BIG,
    CloseCode.INTERNAL_ERROR: CloseReason.ERROR,
    CloseCode.TRY_AGAIN_LATER: CloseReason.ERROR,
    GatewayCloseCode.IDLE: CloseReason.IDLE,
    GatewayCloseCode.TOO_SLOW: CloseReason.TOO_SLOW,
    CloseCode.POLICY_VIOLATION: CloseReason.POLICY_VIOLATION,
}


def effective_close(ws: Connection) -> tuple[int, str]:
    """The code and reason that ended the connection: ours when we closed first, else the bot's.

    websockets' ``close_code`` is the code *received*: a bot that never answers the
    close we sent (1009 for a message too big) would be recorded as 1006.
    """
    protocol = ws.protocol
    sent, received = protocol.close_sent, protocol.close_rcvd
    if sent is not None and (received is None or not protocol.close_rcvd_then_sent):
        return int(sent.code), sent.reason
    if received is not None:
        return int(received.code), received.reason
    return int(CloseCode.ABNORMAL_CLOSURE), ""
