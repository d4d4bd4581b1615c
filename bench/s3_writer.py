"""What the S3 store's writer costs for an upload that arrives over a network: reading
the source and sending parts overlap (one part in flight while the next fills), so a
write should take about the longer of the two, not their sum.

    .venv/bin/python bench/s3_writer.py [--mib 64] [--part-mib 8] [--rate-mib-s 0]
                                        [--window-mib 4]

Runs moto's S3 server (tests/s3_server.py) on this machine and measures, in one run:
the source alone (``--mib`` MiB delivered at ``--rate-mib-s``, 0: the rate at which the
send alone goes, where overlap matters most; at most ``--window-mib`` wait unread), the
send alone (the same bytes as parts with bare boto3 calls, one after another, from
memory), and ``S3FileStore.write_from`` on the throttled source. Prints the write
against their sum (what a writer that sends each part before reading on takes) and
against the longer one (the floor). Not part of the test run; moto is no S3, so the
absolute figures say little, the ratios more.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.filestore.s3 import S3FileStore
from tests.s3_server import MotoServer

MIB = 1024 * 1024


class Throttled(io.RawIOBase):
    """``size`` bytes at ``rate`` bytes/s in 64 KiB reads, as a client upload arrives:
    while nobody reads, at most ``window`` bytes pile up (the socket's receive buffer)
    and the client waits; so time spent not reading is lost, as on a real connection."""

    def __init__(self, size: int, rate: float, window: int) -> None:
        self.left, self.rate, self.window = size, rate, window
        self.piece = bytes(range(256)) * 256
        self.ready_at = time.perf_counter()  # when the next byte has arrived

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left, len(self.piece))
        now = time.perf_counter()
        self.ready_at = max(self.ready_at, now - self.window / self.rate) + n / self.rate
        if (late := self.ready_at - now) > 0:
            time.sleep(late)
        buffer[:n] = self.piece[:n]
        self.left -= n
        return n


def timed(step: Any) -> float:
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def send_alone(client: Any, bucket: str, size: int, part: int) -> float:
    data = bytes(range(256)) * (part // 256)

    def send() -> None:
        upload = client.create_multipart_upload(Bucket=bucket, Key="raw")["UploadId"]
        parts = []
        for number in range(1, -(-size // part) + 1):
            body = data[: min(part, size - (number - 1) * part)]
            answer = client.upload_part(
                Bucket=bucket, Key="raw", UploadId=upload, PartNumber=number, Body=body
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        client.complete_multipart_upload(
            Bucket=bucket, Key="raw", UploadId=upload, MultipartUpload={"Parts": parts}
        )

    send()  # warm: connections, moto's first upload
    return timed(send)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--part-mib", type=int, default=8)
    parser.add_argument("--rate-mib-s", type=float, default=0.0)
    parser.add_argument("--window-mib", type=float, default=4.0, help="receive buffer")
    args = parser.parse_args()
    size, part = args.mib * MIB, args.part_mib * MIB
    with tempfile.TemporaryDirectory() as root:
        moto = MotoServer(Path(root)).start()
        try:
            client, bucket = moto.client(), moto.new_bucket()
            send_s = send_alone(client, bucket, size, part)
            rate = args.rate_mib_s * MIB or size / send_s
            window = int(args.window_mib * MIB)
            source_s = timed(lambda: Throttled(size, rate, window).read())
            store = S3FileStore(client, bucket, "bench", part_bytes=part)
            write_s = timed(lambda: store.write_from("w", Throttled(size, rate, window)))
        finally:
            moto.stop()
    print(f"{args.mib} MiB in {args.part_mib} MiB parts, source at {rate / MIB:.0f} MiB/s")
    print(f"source alone {source_s:.2f} s; send alone {send_s:.2f} s; write {write_s:.2f} s")
    print(
        f"write / (source + send) {write_s / (source_s + send_s):.2f}; "
        f"write / max(source, send) {write_s / max(source_s, send_s):.2f}"
    )


if __name__ == "__main__":
    main()
