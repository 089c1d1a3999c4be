"""A user's own text: `.txt` files (whole file is one document) and `.jsonl` (one per line)."""
from __future__ import annotations

import json
from pathlib import Path


def read_documents(paths: list[str], jsonl_field: str = "text", key: str = "data.calib_files") -> list[str]:
    if not paths:
        raise ValueError(f"{key} is empty; give one or more .txt or .jsonl files.")
    docs: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} does not exist.")
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if jsonl_field not in record:
                    raise KeyError(f"{path}:{lineno} has no field {jsonl_field!r}; set data.jsonl_field.")
                docs.append(str(record[jsonl_field]))
        elif path.suffix in (".txt", ".md", ""):
            docs.append(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{key}: {path} is neither .txt nor .jsonl.")
    return docs


def join_documents(docs: list[str]) -> str:
    """Documents are joined like the novels of the reference corpus: a blank line between."""
    return "\n\n".join(docs)
