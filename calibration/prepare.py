"""Fetch the public-domain / free text behind the built-in sets and print what each set holds.

    .venv/bin/python calibration/prepare.py

The sets themselves are defined in minicpm_compress/data/textsets.py (see README.md beside this file);
this script fetches their Debian packages into the cache and prints each set's size and a sha256 of
its text, so two machines can confirm they calibrate and evaluate on the same text.
"""

import hashlib

from minicpm_compress.data.textsets import BUILTIN_SETS, read_documents


def main() -> None:
    print(f"{'set':16} {'documents':>9} {'characters':>10}  sha256")
    for name in BUILTIN_SETS:
        docs = read_documents(name)
        digest = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()[:16]
        print(f"{name:16} {len(docs):9d} {sum(map(len, docs)):10d}  {digest}")


if __name__ == "__main__":
    main()
