"""Data at scale: prepare and loader throughput of token shards, loader memory, resume latency, seq2seq padding.

    python -m benchmarks.data_throughput --workdir /tmp/data_bench --gb 2 [--litdata]

One run, on a generated local corpus (the shipped Shakespeare, Bible and aclsum texts cut into documents and
written in shuffled order into 64 MB JSONL files until --gb GB):
- prepare throughput (tokens/s) of `python -m lit_iiet prepare` with 1 and 2 worker processes on a sample
  of --sample_files files, and with 2 workers on the whole corpus; the first half of the whole corpus's shard
  files (prepare cuts pieces per file, so they are what it writes for those files) is the "half" corpus;
- loader throughput in tokens/s of one process (ShardedLMDataModule's training loader, num_workers 0, the
  340M configs' seq_len 2048 x batch 8), against what a 340M IIET r = 3 model consumes at 45% MFU on one H100
  (from Decoder.flops: a training step ~ 3 forward passes; 989 TFLOP/s dense bf16 peak);
- the loader process's peak RSS reading the half and the whole corpus (each probe in a fresh process);
- time from building the loader of a resumed run (half an epoch consumed) to its first batch;
- with --litdata (needs `pip install litdata --no-deps` + its small deps), the same probes on litdata's
  StreamingDataset / TokensLoader over the same tokens;
- padding fraction of seq2seq batches before and after length bucketing (benchmarks.seq2seq_padding).
Timings are wall-clock on this machine; the page cache is warm (the shards were just written).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE = 989.4e12
SEQ_LEN, BATCH = 2048, 8


def shipped_documents() -> list[str]:
    """Documents of a few KB from the shipped corpora: Shakespeare scenes-ish (40 paragraphs), Bible chapters
    (20 verses per side), aclsum documents."""
    docs = []
    for split in ("train", "valid", "test"):
        with gzip.open(ROOT / "data/shakespeare" / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
            paragraphs = f.read().split("\n\n")
        docs += ["\n\n".join(paragraphs[i : i + 40]) for i in range(0, len(paragraphs), 40)]
    for path in sorted((ROOT / "data/bible").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        for side in ("fr", "en"):
            verses = [r[side] for r in rows if side in r]
            docs += ["\n".join(verses[i : i + 20]) for i in range(0, len(verses), 20)]
    for path in sorted((ROOT / "data/aclsum").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["document"] for line in f]
    return [d for d in docs if d.strip()]


def build_corpus(folder: Path, gb: float, file_mb: int = 64, seed: int = 0) -> list[Path]:
    """JSONL files of shuffled shipped documents, file_mb MB each, until gb GB are written (reused if present)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(2, round(gb * 1024 / file_mb))
    files = [folder / f"part-{i:04d}.jsonl" for i in range(n_files)]
    if all(f.exists() for f in files):
        return files
    docs = [json.dumps({"text": d}) + "\n" for d in shipped_documents()]
    rng = random.Random(seed)
    for path in files:
        order, size = list(range(len(docs))), 0
        with open(path, "w", encoding="utf-8") as f:
            while size < file_mb << 20:
                rng.shuffle(order)
                for i in order:
                    f.write(docs[i])
                    size += len(docs[i].encode())
                    if size >= file_mb << 20:
                        break
    return files


def prepare_shards(files: list[Path], out: Path, tokenizer: Path, workers: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet",
        "prepare",
        str(out),
        "--train",
        json.dumps(list(map(str, files))),
        "--tokenizer",
        str(tokenizer),
        "--workers",
        str(workers),
    ]
    result = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"]
    # The manifest holds no timings (a resumed prepare writes the same bytes): read its last stdout line.
    seconds = float(re.search(r"tokens tokenized in ([\d.]+) s", result.stdout).group(1))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "text_bytes": sum(f.stat().st_size for f in files),
    }


def memory() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_anon_mb": int(status["RssAnon"].split()[0]) / 1024,
    }


def time_batches(loader, batches: int) -> float:
    """Seconds for `batches` batches of a loader, after its first (which starts it)."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def probe_shards(folder: str, batches: int) -> dict:
    """Runs in a fresh process: tokens/s of the training loader, memory, and first batch after a resume."""
    from torch.utils.data import DataLoader

    from lit_iiet.data.lm import PackedDataset, ResumableSampler
    from lit_iiet.data.shards import ShardedLMDataModule

    dm = ShardedLMDataModule(folder, seq_len=SEQ_LEN, batch_size=BATCH, num_workers=0)
    seconds = time_batches(dm.train_dataloader(), batches)
    mem = memory()
    dataset = PackedDataset(dm.token_stream("train"), SEQ_LEN)
    start = time.perf_counter()
    half = len(dataset) // BATCH // 2 * BATCH
    resumed = DataLoader(dataset, batch_size=BATCH, sampler=ResumableSampler(dataset, 1, 0, True, 0, skip=half))
    next(iter(resumed))
    return {
        "tokens_per_s": batches * BATCH * (SEQ_LEN + 1) / seconds,
        "windows": len(dataset),
        "resume_first_batch_s": time.perf_counter() - start,
        **mem,
    }


def shard_tokens(path: str):
    """litdata's optimize item function: the tokens of one of our shard files."""
    import numpy as np
    import torch

    yield torch.from_numpy(np.load(path).astype(np.int32))


def to_litdata(shards: Path, out: Path) -> None:
    """The same token stream as litdata chunks (one item per shard file, TokensLoader)."""
    from litdata import TokensLoader, optimize

    parts = [
        str(shards / p["path"]) for p in json.loads((shards / "manifest.json").read_text())["splits"]["train"]["files"]
    ]
    optimize(
        fn=shard_tokens,
        inputs=parts,
        output_dir=str(out),
        chunk_size=(SEQ_LEN + 1) * 1024,
        item_loader=TokensLoader(),
        num_workers=1,
        reorder_files=False,
        verbose=False,
    )


def probe_litdata(folder: str, batches: int) -> dict:
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

    def loader():
        dataset = StreamingDataset(
            folder, item_loader=TokensLoader(block_size=SEQ_LEN + 1), shuffle=True, drop_last=True
        )
        return StreamingDataLoader(dataset, batch_size=BATCH, num_workers=0)

    first = loader()
    seconds = time_batches(first, batches)
    mem = memory()
    state = first.state_dict()
    start = time.perf_counter()
    resumed = loader()
    resumed.load_state_dict(state)
    next(iter(resumed))
    return {
        "tokens_per_s": batches * BATCH * (SEQ_LEN + 1) / seconds,
        "resume_first_batch_s": time.perf_counter() - start,
        "note": f"resumed after {batches + 1} batches",
        **mem,
    }


def probe(kind: str, folder: Path, batches: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_throughput", "--probe", kind, str(folder), "--batches", str(batches)]
    result = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def needed_tokens_per_s() -> float:
    """Tokens/s that a 340M IIET r = 3 model trains on at 45% MFU of one H100 (bf16 dense peak)."""
    import torch
    import yaml

    from lit_iiet.nn.decoder import Decoder, DecoderConfig
    from lit_iiet.nn.ode import ODEConfig

    model = yaml.safe_load((ROOT / "conf/lm/slimpajama.yaml").read_text())["model"]["init_args"]
    with torch.device("meta"):
        decoder = Decoder(DecoderConfig(**model["arch"]), ODEConfig(**model["ode"]))
    train_flops_per_token = 3 * decoder.flops(1, SEQ_LEN) / SEQ_LEN
    return 0.45 * H100_BF16_DENSE / train_flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lit_iiet_data_bench"))
    parser.add_argument("--gb", type=float, default=2.0, help="size of the generated text corpus")
    parser.add_argument("--file_mb", type=int, default=64, help="size of each corpus file")
    parser.add_argument("--vocab_size", type=int, default=32000, help="BPE tokenizer trained on the shipped text")
    parser.add_argument("--batches", type=int, default=2000, help="loader batches timed per probe")
    parser.add_argument(
        "--sample_files", type=int, default=4, help="files of the 1-worker / 2-worker prepare comparison"
    )
    parser.add_argument("--litdata", action="store_true", help="also probe litdata over the same tokens")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        kind, folder = args.probe
        print(json.dumps((probe_shards if kind == "shards" else probe_litdata)(folder, args.batches)))
        return

    from lit_iiet.data.tokenizer import Tokenizer

    work = args.workdir
    files = build_corpus(work / "corpus", args.gb, args.file_mb)
    half = files[: len(files) // 2]
    tokenizer = work / f"bpe{args.vocab_size}.model"
    if not tokenizer.exists():
        lines = (line for d in shipped_documents() for line in d.splitlines() if line.strip())
        Tokenizer.train(lines, tokenizer, args.vocab_size)
    runs = {}
    sample = files[: args.sample_files]
    for name, subset, workers in (("sample-1", sample, 1), ("sample-2", sample, 2), ("all-2", files, 2)):
        out = work / f"shards-{name}"
        if out.exists():
            shutil.rmtree(out)
        runs[name] = prepare_shards(subset, out, tokenizer, workers)
    # The first half of the files as a shard folder of its own: the same files prepare writes for them (pieces
    # are cut per file), under a manifest naming only those.
    half_dir = work / "shards-half"
    if half_dir.exists():
        shutil.rmtree(half_dir)
    (half_dir / "train").mkdir(parents=True)
    manifest = json.loads((work / "shards-all-2" / "manifest.json").read_text())
    parts = manifest["splits"]["train"]["files"][: len(half)]
    for part in parts:
        os.link(work / "shards-all-2" / part["path"], half_dir / part["path"])
    shutil.copy(work / "shards-all-2" / "tokenizer.model", half_dir / "tokenizer.model")
    manifest["splits"]["train"] = {
        "tokens": sum(p["tokens"] for p in parts),
        "documents": sum(p["documents"] for p in parts),
        "files": parts,
    }
    (half_dir / "manifest.json").write_text(json.dumps(manifest))
    gb_of = {name: run["text_bytes"] / 2**30 for name, run in runs.items()}
    gb_of["half"], gb_of["all"] = sum(f.stat().st_size for f in half) / 2**30, gb_of["all-2"]
    loads = {
        "half": probe("shards", half_dir, args.batches),
        "all": probe("shards", work / "shards-all-2", args.batches),
    }
    if args.litdata:
        for name, source in (("half", half_dir), ("all", work / "shards-all-2")):
            target = work / f"litdata-{name}"
            if not (target / "index.json").exists():
                to_litdata(source, target)
            loads[f"litdata {name}"] = probe("litdata", target, args.batches)
    needed = needed_tokens_per_s()

    print(
        f"Corpus: {len(files)} JSONL files, {gb_of['all']:.2f} GB of text ({runs['all-2']['tokens']:,} tokens with a "
        f"{args.vocab_size}-piece BPE); half = the first {len(half)} files ({gb_of['half']:.2f} GB); sample = the "
        f"first {len(sample)} files.\n"
    )
    print("| prepare | text | workers | tokens | seconds | tokens/s |\n|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(
            f"| {name.rsplit('-', 1)[0]} | {gb_of[name]:.2f} GB | {name[-1]} | {run['tokens']:,} | {run['seconds']:.1f} | "
            f"{run['tokens_per_s']:,.0f} |"
        )
    print(
        f"\nA 340M IIET r = 3 model at 45% MFU on one H100 trains on {needed:,.0f} tokens/s "
        f"(seq_len {SEQ_LEN}, 3 x Decoder.flops per step).\n"
    )
    print(
        "| loader | corpus | tokens/s (1 process) | x needed | peak RSS MB | anon RSS MB | first batch after resume, s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, load in loads.items():
        kind = "litdata" if name.startswith("litdata") else "shards (ours)"
        print(
            f"| {kind} | {gb_of[name.split()[-1]]:.2f} GB | {load['tokens_per_s']:,.0f} | {load['tokens_per_s'] / needed:.0f}x | "
            f"{load['peak_rss_mb']:.0f} | {load['rss_anon_mb']:.0f} | {load['resume_first_batch_s']:.3f} |"
        )
    try:
        from benchmarks.seq2seq_padding import main as padding_main
    except ImportError:
        return
    print()
    sys.argv = [sys.argv[0]]
    padding_main()


if __name__ == "__main__":
    main()
