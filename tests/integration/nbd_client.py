"""A deliberately small NBD client on a raw socket, for the tests that send
what real clients never would (bad magic, oversized lengths, a client that
vanishes). Written from the protocol document, independently of the server:
it decodes every byte the server sends and checks the framing."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT = {
    "EXPORT_NAME": 1,
    "ABORT": 2,
    "LIST": 3,
    "STARTTLS": 5,
    "INFO": 6,
    "GO": 7,
    "STRUCTURED_REPLY": 8,
    "LIST_META_CONTEXT": 9,
    "SET_META_CONTEXT": 10,
}
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = {
    (1 << 31) + 1: "UNSUP",
    (1 << 31) + 2: "POLICY",
    (1 << 31) + 3: "INVALID",
    (1 << 31) + 6: "UNKNOWN",
    (1 << 31) + 7: "SHUTDOWN",
    (1 << 31) + 9: "TOO_BIG",
}
CMD = {
    "READ": 0,
    "WRITE": 1,
    "DISC": 2,
    "FLUSH": 3,
    "TRIM": 4,
    "CACHE": 5,
    "WRITE_ZEROES": 6,
    "BLOCK_STATUS": 7,
}
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE = 1, 2, 4, 8
ERRNO = {
    0: "OK",
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3


class OptionFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass
class Reply:
    cookie: int
    error: str  # "OK" or the errno name
    data: bytes = b""
    message: str = ""
    #: Structured: (type, flags, payload) of every chunk.
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)


class RawNbd:
    def __init__(self, sock_path: str, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.structured = False
        self.size = 0
        self.flags = 0
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed the connection ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True if the server hangs up (EOF or reset) before sending anything else."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake ----------------------------------------------------------------------

    def greet(self, client_flags: int = 3) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and ihaveopt == IHAVEOPT, (hex(magic), hex(ihaveopt))
        self.send(struct.pack(">I", client_flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None) -> None:
        n = len(data) if length is None else length
        self.send(struct.pack(">QII", IHAVEOPT, option, n) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return option, rtype, self.recv_exact(length) if length else b""

    def option_replies(self, option: int) -> list[tuple[int, bytes]]:
        """Replies to ``option`` up to the final one; raise OptionFailed on an error."""
        out = []
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == option, (opt, option)
            if rtype & (1 << 31):
                raise OptionFailed(REP_ERR.get(rtype, hex(rtype)), data.decode(errors="replace"))
            if rtype == REP_ACK:
                return out
            out.append((rtype, data))

    def structured_reply(self) -> None:
        self.send_option(OPT["STRUCTURED_REPLY"])
        self.option_replies(OPT["STRUCTURED_REPLY"])
        self.structured = True

    @staticmethod
    def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return (
            struct.pack(">I", len(raw))
            + raw
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos)
        )

    def info(self, name: str, infos: tuple[int, ...] = (), *, go: bool = False) -> dict[int, bytes]:
        option = OPT["GO"] if go else OPT["INFO"]
        self.send_option(option, self.info_data(name, infos))
        out: dict[int, bytes] = {}
        for rtype, data in self.option_replies(option):
            assert rtype == REP_INFO
            (itype,) = struct.unpack(">H", data[:2])
            out[itype] = data[2:]
        size, flags = struct.unpack(">QH", out[INFO_EXPORT])
        if go:
            self.size, self.flags = size, flags
        return out

    def go(self, name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> dict[int, bytes]:
        return self.info(name, infos, go=True)

    @staticmethod
    def meta_data(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q.encode())) + q.encode()
        return out

    def meta(self, name: str, queries: list[str], *, set_: bool = True) -> dict[str, int]:
        option = OPT["SET_META_CONTEXT"] if set_ else OPT["LIST_META_CONTEXT"]
        self.send_option(option, self.meta_data(name, queries))
        out = {}
        for rtype, data in self.option_replies(option):
            assert rtype == REP_META_CONTEXT
            (ctx_id,) = struct.unpack(">I", data[:4])
            out[data[4:].decode()] = ctx_id
        return out

    def list_exports(self) -> list[str]:
        self.send_option(OPT["LIST"])
        names = []
        for rtype, data in self.option_replies(OPT["LIST"]):
            assert rtype == REP_SERVER
            (n,) = struct.unpack(">I", data[:4])
            names.append(data[4 : 4 + n].decode())
        return names

    def open(self, name: str, *, structured: bool = True, meta: list[str] | None = None) -> None:
        """Handshake through to transmission on export ``name``."""
        self.greet()
        if structured:
            self.structured_reply()
        if meta:
            self.meta(name, meta)
        self.go(name)

    # -- transmission --------------------------------------------------------------------

    def request(
        self, cmd: str | int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        self._cookie += 1
        code = CMD[cmd] if isinstance(cmd, str) else cmd
        self.send(
            struct.pack(">IHHQQI", REQUEST_MAGIC, flags, code, self._cookie, offset, length) + data
        )
        return self._cookie

    def reply(self, read_length: int = 0) -> Reply:
        """The next reply; ``read_length``: the data a successful simple read carries."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if (read_length and not err) else b""
            return Reply(cookie, ERRNO.get(err, str(err)), data)
        assert magic == STRUCTURED_MAGIC, hex(magic)
        assert self.structured, "structured reply without negotiation"
        reply: Reply | None = None
        buf = bytearray()
        while True:
            if reply is not None:
                (magic,) = struct.unpack(">I", self.recv_exact(4))
                assert magic == STRUCTURED_MAGIC, hex(magic)
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            if reply is None:
                reply = Reply(cookie, "OK")
            assert cookie == reply.cookie, "chunks of two replies interleaved"
            reply.chunks.append((rtype, flags, payload))
            if rtype == 1:  # OFFSET_DATA
                buf += payload[8:]
            elif rtype & (1 << 15):  # an error chunk
                err, mlen = struct.unpack(">IH", payload[:6])
                reply.error = ERRNO.get(err, str(err))
                reply.message = payload[6 : 6 + mlen].decode(errors="replace")
            if flags & 1:  # DONE
                reply.data = bytes(buf)
                return reply

    def call(
        self, cmd: str, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> Reply:
        cookie = self.request(cmd, offset, length, flags, data)
        reply = self.reply(length if cmd == "READ" else 0)
        assert reply.cookie == cookie
        return reply

    def read(self, offset: int, length: int) -> bytes:
        reply = self.call("READ", offset, length)
        assert reply.error == "OK", reply
        return reply.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.call("WRITE", offset, len(data), flags, data)

    def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> dict[int, list[tuple[int, int]]]:
        """context id -> [(length, flags)]."""
        reply = self.call("BLOCK_STATUS", offset, length, flags)
        assert reply.error == "OK", reply
        out = {}
        for rtype, _flags, payload in reply.chunks:
            assert rtype == 5, rtype
            (ctx,) = struct.unpack(">I", payload[:4])
            body = payload[4:]
            out[ctx] = [struct.unpack(">II", body[i : i + 8]) for i in range(0, len(body), 8)]
        return out

    def disconnect(self) -> None:
        self.request("DISC")
