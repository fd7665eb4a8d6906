"""Benchmark: prepare a 100 MB byte file through the enwik8 pipeline; print time and memory.

Set-up (not timed): 10^8 bytes with an enwik8-like distribution over 205 distinct byte
values (printable ASCII with letter-like Zipf frequencies, newlines and tabs, and 108
byte values >= 0x80 as UTF-8 text has) are zipped like enwik8.zip (one member,
``enwik8``) and registered as ``bench_enwik8``: enwik8's spec with this file's
checksums. Timed, in a fresh process: ``rhn data fetch bench_enwik8 --from enwik8.zip``
(archive checksum, safe extraction with the member's checksum, two streaming passes
of tokenisation, three .npy files written and committed), then opening the cache as
training does. Peak memory is the child's maximum resident set size.

    python benchmarks/prepare_enwik8.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SIZE = 100_000_000
DISTINCT = 205
HELD_OUT = 5_000_000


def generate(path: Path, seed: int = 0) -> None:
    """Write ``SIZE`` bytes using exactly ``DISTINCT`` byte values, in a shuffled order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ascii_by_frequency = list(b" etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ")
    ascii_by_frequency += [b for b in range(33, 127) if b not in ascii_by_frequency]
    ascii_by_frequency += [ord("\n"), ord("\t")]
    high = list(range(0x80, 0x80 + DISTINCT - len(ascii_by_frequency)))
    values = np.array(ascii_by_frequency + high, dtype=np.uint8)
    assert len(set(values.tolist())) == DISTINCT
    weights = 1.0 / np.arange(1, len(ascii_by_frequency) + 1) ** 1.1  # Zipf-like text
    weights = np.concatenate([weights / weights.sum() * 0.99, np.full(len(high), 0.01 / len(high))])
    counts = np.maximum((weights * SIZE).astype(np.int64), 1)
    counts[0] += SIZE - counts.sum()  # spaces absorb the rounding
    data = np.repeat(values, counts)
    rng.shuffle(data)
    data.tofile(path)


def peak_rss_mib() -> float:
    """This process's peak resident set size since it started (exec'd).

    Linux's VmHWM belongs to the process image, whereas ru_maxrss also carries the
    parent's peak over fork+exec (here, the set-up's 100 MB arrays).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(zip_path: Path, data_dir: Path, zip_sha256: str, member_md5: str) -> None:
    """Runs in a fresh interpreter: register, fetch (timed), open; print a JSON report."""
    os.environ["RHN_DATA_DIR"] = str(data_dir)
    from dataclasses import replace

    from rhn_cli.data.loading import open_dataset
    from rhn_cli.data.registry import DATASETS, ENWIK8
    from rhn_cli.data.store import fetch_dataset

    spec = replace(
        ENWIK8,
        name="bench_enwik8",
        archive=replace(
            ENWIK8.archive, hash=f"sha256:{zip_sha256}", size=zip_path.stat().st_size, urls=()
        ),
        files=(replace(ENWIK8.files[0], hash=f"md5:{member_md5}"),),
    )
    DATASETS[spec.name] = spec
    baseline_mib = peak_rss_mib()
    started = time.perf_counter()

    def echo(message: str) -> None:
        print(f"  [{time.perf_counter() - started:6.2f} s] {message}", file=sys.stderr)

    fetch_dataset(spec.name, str(zip_path), echo=echo)
    prepared = time.perf_counter()
    corpus = open_dataset(spec, echo=echo)
    opened = time.perf_counter()
    peak_mib = peak_rss_mib()
    report = {
        "prepare_s": prepared - started,
        "open_s": opened - prepared,
        "peak_rss_mib": peak_mib,
        "baseline_rss_mib": baseline_mib,
        "tokens": [len(corpus.train), len(corpus.valid), len(corpus.test)],
        "vocab": corpus.vocab_size,
        "dtype": str(corpus.train.dtype),
        "cache_mib": sum(f.stat().st_size for f in (data_dir / spec.name).iterdir()) / 2**20,
    }
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep the files")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        zip_path, data_dir, zip_sha256, member_md5 = args.child
        child(Path(zip_path), Path(data_dir), zip_sha256, member_md5)
        return

    with tempfile.TemporaryDirectory(prefix="rhn-bench-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        raw, zip_path = work / "enwik8", work / "enwik8.zip"
        print(f"set-up: generating {SIZE:,} bytes over {DISTINCT} byte values, zipping ...")
        generate(raw)
        member_md5 = hashlib.md5(raw.read_bytes()).hexdigest()
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            archive.write(raw, "enwik8")
        raw.unlink()
        zip_sha256 = hashlib.sha256(zip_path.read_bytes()).hexdigest()
        print(f"set-up: enwik8.zip {zip_path.stat().st_size / 2**20:.1f} MiB")

        command = [sys.executable, __file__, "--child", str(zip_path), str(work / "data")]
        out = subprocess.run(command + [zip_sha256, member_md5], capture_output=True, text=True)
        print(out.stderr, end="")  # the timed stages, as the child logged them
        if out.returncode != 0:
            sys.exit(out.returncode)
        report = json.loads(out.stdout.strip().splitlines()[-1])

    tokens = "/".join(f"{n:,}" for n in report["tokens"])
    print(f"prepared {tokens} tokens, vocabulary {report['vocab']}, {report['dtype']}")
    print(
        f"wall time: {report['prepare_s']:.2f} s to fetch --from enwik8.zip and prepare "
        f"({SIZE / 2**20 / report['prepare_s']:.0f} MiB/s); {report['open_s'] * 1000:.1f} ms "
        "to open the memory-mapped cache"
    )
    print(
        f"peak memory (max RSS): {report['peak_rss_mib']:.0f} MiB "
        f"(interpreter and imports alone: {report['baseline_rss_mib']:.0f} MiB)"
    )
    print(f"cache on disk: {report['cache_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
