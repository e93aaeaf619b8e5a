"""What checking a shard's sha256 costs the trainer's reader, and hashing first vs while streaming.

    .venv/bin/python bench/bench_shard_hash.py                 # a ~90 MB shard: 57 samples of 8 x 256 x 256
    .venv/bin/python bench/bench_shard_hash.py --samples 10    # quicker

Writes one synthetic shard (random uint8 bursts, stored-PNG targets, members as the pipeline
names them) to a temporary folder and times, with the file in the page cache (the second and
later reads of a shard; a cold first read adds the disk's time to every row alike):

    read          trainer.data.read_shard without a checksum (tar members to bytes)
    sha256        hashlib.file_digest over the file alone
    hash-stream   read_shard's tar parse (tarfile "r:", as pipeline.format.iter_shard reads) through
                  a reader that hashes every byte as it is first read, rest of the file hashed at
                  the end (the mismatch is known only after the last sample)
    hash-first    trainer.data.read_shard as it is: the file hashed, then parsed (nothing yielded
                  from a corrupt shard)
    read+decode   read_shard + decode_sample of every sample, no checksum (what training pays anyway)

Median of --repeat runs, milliseconds per shard and per sample. Wall clock on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.data import Shard, decode_sample, read_shard  # noqa: E402


class HashingReader:
    """A binary file whose bytes go through a sha256 as they are first read (the streaming
    alternative). Seekable as tarfile's "r:" mode needs it: a forward seek reads and hashes the
    bytes it skips (member padding); bytes read again after a backward seek are not hashed twice."""

    def __init__(self, f):
        self.f, self.sha256, self.hashed = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        at = self.f.tell()
        data = self.f.read(n)
        if at + len(data) > self.hashed:
            self.sha256.update(memoryview(data)[self.hashed - at:])
            self.hashed = at + len(data)
        return data

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0 and pos > self.hashed:
            self.f.seek(self.hashed)
            while self.hashed < pos and self.read(min(pos - self.hashed, 1 << 20)):
                pass
        return self.f.seek(pos, whence)


def write_shard(path: Path, samples: int, frames: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            key = f"train-000000-{i:06d}"
            burst = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
            npy, png = io.BytesIO(), io.BytesIO()
            np.save(npy, burst, allow_pickle=False)
            Image.fromarray(burst[0]).save(png, format="PNG", compress_level=0)
            for name, data in ((f"{key}.burst.npy", npy.getvalue()), (f"{key}.json", b'{"shift": null}'),
                               (f"{key}.target.png", png.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=57)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-000000.tar"
        write_shard(path, args.samples, args.frames, args.size)
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        plain = Shard(path, args.samples, path.stat().st_size, 0)
        checked = Shard(path, args.samples, path.stat().st_size, 0, digest)

        def sha256():
            with open(path, "rb") as f:
                hashlib.file_digest(f, "sha256").hexdigest()

        def hash_stream():
            with open(path, "rb") as f:
                reader = HashingReader(f)
                with tarfile.open(fileobj=reader, mode="r:") as tar:  # as iter_shard reads it
                    for info in tar:
                        tar.extractfile(info).read()
                while reader.read(1 << 20):  # the end-of-archive blocks tarfile does not read
                    pass
                assert reader.sha256.hexdigest() == digest

        cases = {
            "read": lambda: sum(1 for _ in read_shard(plain)),
            "sha256": sha256,
            "hash-stream": hash_stream,
            "hash-first": lambda: sum(1 for _ in read_shard(checked)),
            "read+decode": lambda: [decode_sample(r, plain, args.frames, args.size) for r in read_shard(plain)],
        }
        print(f"shard: {path.stat().st_size / 1e6:.1f} MB, {args.samples} samples of "
              f"{args.frames}x{args.size}x{args.size}x3; median of {args.repeat}, file in the page cache")
        print(f"{'case':<12} {'ms/shard':>9} {'ms/sample':>10}")
        for name, fn in cases.items():
            fn()  # warm: the file in the page cache, imports done
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * float(np.median(times))
            print(f"{name:<12} {ms:9.1f} {ms / args.samples:10.2f}")


if __name__ == "__main__":
    main()
