#!/usr/bin/env python3
"""The unused-dependency check (what `cargo machete` does, without building
it on every CI machine): every dependency a workspace crate declares must be
named in that crate's code. `[dependencies]` are looked for in `src/` (and
`build.rs`), `[dev-dependencies]` in `src/`, `tests/`, `benches/` and
`examples/`. A name counts when it appears as a path (`name::`), in a `use`,
or in `extern crate`. Exits 1 with the unused ones."""
import os
import re
import sys
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def rust_text(crate_dir, folders):
    text = []
    for f in folders:
        p = os.path.join(crate_dir, f)
        if os.path.isfile(p):
            text.append(open(p, encoding="utf-8").read())
        for dirpath, _, files in os.walk(p):
            for n in files:
                if n.endswith(".rs"):
                    text.append(open(os.path.join(dirpath, n), encoding="utf-8").read())
    return "\n".join(text)


def used(lib, text):
    return re.search(rf"(\b{lib}::|\buse\s+{lib}\b|extern\s+crate\s+{lib}\b|#\[{lib}::)", text) is not None


def lib_name(dep, spec, members):
    if isinstance(spec, dict) and "package" in spec:
        dep = spec["package"]
    # A workspace member with a [lib] name of its own.
    for m in members:
        cargo = tomllib.load(open(os.path.join(ROOT, m, "Cargo.toml"), "rb"))
        if cargo["package"]["name"] == dep and "lib" in cargo and "name" in cargo["lib"]:
            return cargo["lib"]["name"]
    return dep.replace("-", "_")


def main():
    ws = tomllib.load(open(os.path.join(ROOT, "Cargo.toml"), "rb"))
    members = ws["workspace"]["members"]
    unused = []
    for m in members:
        d = os.path.join(ROOT, m)
        cargo = tomllib.load(open(os.path.join(d, "Cargo.toml"), "rb"))
        main_text = rust_text(d, ["src", "build.rs"])
        dev_text = main_text + rust_text(d, ["tests", "benches", "examples"])
        for section, text in (("dependencies", main_text), ("dev-dependencies", dev_text)):
            for dep, spec in cargo.get(section, {}).items():
                if not used(lib_name(dep, spec, members), text):
                    unused.append(f"{m}/Cargo.toml [{section}] {dep}")
    if unused:
        print("unused dependencies:\n  " + "\n  ".join(unused))
        sys.exit(1)
    print(f"dependencies: every declared dependency of {len(members)} crates is used")


if __name__ == "__main__":
    main()
