#!/usr/bin/env python3
"""Checks that every relative link in the repository's Markdown files
resolves inside the repository: the file exists and, for `#anchor` links,
the target has a heading with that anchor. Links to web addresses are not
followed (CI has no network). Exits 1 with a list of broken links."""
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```", re.S)


def slug(heading):
    """GitHub's anchor of a heading."""
    h = heading.strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path):
    text = CODE.sub("", open(path, encoding="utf-8").read())
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def markdown_files():
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [os.path.join(ROOT, p) for p in out if os.path.exists(os.path.join(ROOT, p))]


def main():
    broken = []
    for md in markdown_files():
        text = CODE.sub("", open(md, encoding="utf-8").read())
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, frag = target.partition("#")
            dest = md if not path else os.path.normpath(os.path.join(os.path.dirname(md), path))
            rel = os.path.relpath(md, ROOT)
            if not dest.startswith(ROOT + os.sep) and dest != ROOT:
                broken.append(f"{rel}: {target} points outside the repository")
                continue
            if not os.path.exists(dest):
                broken.append(f"{rel}: {target} does not exist")
                continue
            if frag and dest.endswith(".md") and frag not in anchors(dest):
                broken.append(f"{rel}: {target}: no heading with anchor #{frag}")
    if broken:
        print("broken links:\n  " + "\n  ".join(broken))
        sys.exit(1)
    print(f"links: {len(markdown_files())} Markdown files, every relative link resolves")


if __name__ == "__main__":
    main()
