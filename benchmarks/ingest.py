"""Ingest throughput on a generated corpus: HTML pages and PDF pages, at two sizes, to see whether time grows
linearly with the corpus.

    python benchmarks/ingest.py [--docs 10000] [--pdf-pages 200] [--small 1000]   → benchmarks/results/ingest.json
    python benchmarks/ingest.py --workers 2 [--small 1000]   → the "workers" entry of the same file


The corpus is generated deterministically (seeded `random`): HTML pages with a site menu and footer (boilerplate the
cleaner must remove), a main article of 3-8 paragraphs drawn from city-service sentences, and 1 in 50 pages a near
copy of an earlier one; PDF files of 10 pages each written with fpdf2. Both sizes run the whole `ingest` stage
(read, clean, language, dedup, chunk, write) in one process; the baseline is the small size, and `linearity` is
(time per document at the large size) / (time per document at the small size): 1.0 is linear.

`--workers N` instead times the small corpus read by 1 and by N worker processes (`ingest(workers=N)`), checks that
both write the same bytes, and stores the speedup under "workers", keeping the size runs already in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tailor.data.ingest import ingest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
SUBJECTS = ["The pool", "The central library", "The recycling center", "City hall", "The permit office",
            "The farmers market", "The animal shelter", "The senior center", "Street sweeping", "The bus line"]
VERBS = ["opens", "closes", "accepts applications", "runs", "is staffed", "offers tours", "holds meetings"]
TIMES = ["on weekdays from nine to five", "every Saturday morning", "on the first Monday of the month",
         "from June to September", "after the holiday weekend", "by appointment only", "twice a week"]
EXTRAS = ["Residents should bring a photo ID.", "Fees can be paid online or in person.",
          "Call the front desk for accessibility requests.", "Parking is free in the north lot.",
          "Children under twelve must be accompanied by an adult.", "Forms are available in English and Spanish."]
MENU = "".join(f'<li><a href="/{name}.html">{name.title()}</a></li>' for name in
               ["home", "services", "permits", "parks", "library", "contact"])


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(TIMES)}. {rng.choice(EXTRAS)}"


def html_page(rng: random.Random, number: int) -> str:
    paragraphs = "".join(f"<p>{' '.join(sentence(rng) for _ in range(rng.randint(2, 5)))} Reference {number}-{i}."
                         f"</p>" for i in range(rng.randint(3, 8)))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Page {number}</title></head><body>"
            f"<header>City of Maplewood</header><nav><ul>{MENU}</ul></nav><main><h1>Notice {number}</h1>"
            f"{paragraphs}</main><footer>Copyright City of Maplewood. All rights reserved.</footer></body></html>")


def generate(folder: Path, docs: int, pdf_pages: int, seed: int = 0) -> int:
    """Write the corpus; returns its size in bytes."""
    from fpdf import FPDF

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pages: list[str] = []
    for number in range(docs):
        if pages and number % 50 == 49:  # a near copy: the same page with one sentence appended
            text = pages[rng.randrange(len(pages))].replace("</main>", f"<p>{sentence(rng)}</p></main>")
        else:
            text = html_page(rng, number)
        pages.append(text) if len(pages) < 500 else None
        sub = folder / f"html{number // 1000:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"page{number:05d}.html").write_text(text, encoding="utf-8")
    for file_number in range(0, pdf_pages, 10):
        pdf = FPDF()
        pdf.set_font("Helvetica", size=11)
        for page in range(min(10, pdf_pages - file_number)):
            pdf.add_page()
            pdf.multi_cell(0, 6, " ".join(sentence(rng) for _ in range(12)) + f" Page {file_number + page}.")
        (folder / f"report{file_number // 10:03d}.pdf").write_bytes(bytes(pdf.output()))
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(folder: Path, size_bytes: int, documents: int, workers: int = 1) -> dict:
    started = time.perf_counter()
    summary = ingest([folder], folder.parent / f"{folder.name}.{workers}.corpus.jsonl", workers=workers,
                     progress=False)
    seconds = time.perf_counter() - started
    return {"documents_in": documents, "mb_in": round(size_bytes / 1e6, 2), "seconds": round(seconds, 2),
            "docs_per_s": round(documents / seconds, 1), "mb_per_s": round(size_bytes / 1e6 / seconds, 3),
            "records": summary.records, "documents_kept": summary.documents,
            "near_duplicates_removed": sum(len(c.removed) for c in summary.near_duplicates),
            "boilerplate_lines_removed": summary.boilerplate_lines, "skipped": len(summary.skipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10000, help="HTML documents at the large size")
    parser.add_argument("--small", type=int, default=1000, help="HTML documents at the small size (baseline)")
    parser.add_argument("--pdf-pages", type=int, default=200, help="PDF pages at the large size (scaled down "
                        "for the small size)")
    parser.add_argument("--workers", type=int, default=1, help="compare 1 and this many worker processes on the "
                        "small corpus only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.workers > 1:
        compare_workers(args)
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tailor-ingest-bench-") as tmp:
        for name, docs in (("small", args.small), ("large", args.docs)):
            pdf_pages = max(10, args.pdf_pages * docs // args.docs)
            folder = Path(tmp) / name
            size = generate(folder, docs, pdf_pages)
            runs[name] = measure(folder, size, docs + pdf_pages)
            runs[name]["pdf_pages"] = pdf_pages
            print(name, runs[name], flush=True)
    per_doc = {name: run["seconds"] / run["documents_in"] for name, run in runs.items()}
    result = {"benchmark": "ingest", "machine": {"python": platform.python_version(), "cpu": platform.processor()
                                                 or platform.machine()},
              "note": "single process; timings on a shared CPU are noisy", "runs": runs,
              "linearity": round(per_doc["large"] / per_doc["small"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"linearity": result["linearity"]}))


def compare_workers(args) -> None:
    with tempfile.TemporaryDirectory(prefix="tailor-ingest-bench-") as tmp:
        folder = Path(tmp) / "small"
        pdf_pages = max(10, args.pdf_pages * args.small // args.docs)
        size = generate(folder, args.small, pdf_pages)
        runs = {}
        for workers in (1, args.workers):
            runs[workers] = measure(folder, size, args.small + pdf_pages, workers=workers)
            print(f"workers={workers}", runs[workers], flush=True)
        same = all((Path(tmp) / f"small.{w}.corpus.jsonl").read_bytes() ==
                   (Path(tmp) / "small.1.corpus.jsonl").read_bytes() for w in runs)
    result = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {"benchmark": "ingest"}
    result["workers"] = {"documents_in": args.small + pdf_pages, "cpus": os.cpu_count(),
                         "seconds": {str(w): run["seconds"] for w, run in runs.items()},
                         "docs_per_s": {str(w): run["docs_per_s"] for w, run in runs.items()},
                         "speedup": round(runs[1]["seconds"] / runs[args.workers]["seconds"], 2),
                         "identical_output": same,
                         "note": "workers read, normalize and detect the language; the main process still does "
                                 "personal data, boilerplate, quality filters, MinHash dedup and chunking; each worker "
                                 "process spawns and imports tailor once (about 2 s); timings on a shared CPU are "
                                 "noisy"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["workers"]))


if __name__ == "__main__":
    main()
