"""Docstrings and comments say what the code computes and why; timings, dates and devices belong
in docs/benchmarks.md (generated from the benchmark JSON), where they are kept current."""

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_optlab"

TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ms|us|µs|ns|seconds?)\b")  # a bare "s" is also math (1.5 s - 0.5 s^3)
DATE = re.compile(r"\b20[2-9]\d-\d\d-\d\d\b")
DEVICE = re.compile(r"\b(H100|H200|A100|V100|B200|L40S?|RTX ?\d{4}|MI300X?)\b")
THROUGHPUT = re.compile(r"\b\d[\d,.]*k?\s?(tokens/s|it/s|TFLOP/s|GB/s)\b")


def prose(path: Path):
    """(line, text) of every docstring and comment in a module."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_no_docstring_or_comment_quotes_a_timing_a_date_or_a_device():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in prose(path):
            for pattern in (TIMING, DATE, DEVICE, THROUGHPUT):
                for m in pattern.finditer(text):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {m.group(0)!r}")
    assert not found, "move these to docs/benchmarks.md:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text('"""Takes 1.33 ms on an H100 (2026-11-24), 529k tokens/s."""\n# 4 seconds per snapshot\nx = 1\n')
    texts = [t for _, t in prose(sample)]
    assert TIMING.search(texts[0]) and DATE.search(texts[0]) and DEVICE.search(texts[0])
    assert THROUGHPUT.search(texts[0]) and TIMING.search(texts[1])
    assert not TIMING.search("step_time/optimizer_ms and 3 steps, 2 stacks")
