#!/usr/bin/python3
"""Builds the oomwake .deb with dpkg-deb from Cargo.toml's [package.metadata.deb], the
same table `cargo deb` reads, so both tools make the same package. CI uses this one:
cargo-deb has to be compiled from source first (13.5 min measured on the project's
2-core machine), dpkg-deb is already there.

Usage: packaging/deb/build-deb.py [--binary target/release/oomwake] [--out DIR]
Prints the path of the .deb. Covers what the metadata uses: assets (globs, a trailing
'/' means "into this directory"), conf-files, maintainer-scripts, depends = "$auto"
(the highest GLIBC_ symbol version the binary needs), section, priority,
extended-description. Binaries are stripped and man pages gzipped, as Debian policy
asks.
"""

import argparse
import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def fail(msg):
    print(f"build-deb: {msg}", file=sys.stderr)
    sys.exit(1)


def glibc_depends(binary):
    out = subprocess.run(["objdump", "-T", binary], capture_output=True, text=True, check=True).stdout
    versions = {tuple(int(x) for x in m.split(".")) for m in re.findall(r"GLIBC_([0-9.]+)", out)}
    if not versions:
        return "libc6"
    return "libc6 (>= %s)" % ".".join(str(x) for x in max(versions))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/oomwake")
    ap.add_argument("--out", default="target/debian")
    args = ap.parse_args()
    os.chdir(ROOT)
    with open("Cargo.toml", "rb") as f:
        cargo = tomllib.load(f)
    pkg = cargo["package"]
    meta = pkg["metadata"]["deb"]
    name = pkg["name"]
    version = pkg["version"] + "-" + str(meta.get("revision", "1"))
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()

    stage = tempfile.mkdtemp(prefix="oomwake-deb-")
    os.chmod(stage, 0o755)
    try:
        installed = []
        for src_pat, dest, mode in meta["assets"]:
            if src_pat == "target/release/oomwake":
                src_pat = args.binary
            srcs = sorted(glob.glob(src_pat))
            if not srcs:
                fail(f"asset {src_pat}: no such file")
            for src in srcs:
                if dest.endswith("/"):
                    target = os.path.join(dest, os.path.basename(src))
                else:
                    if len(srcs) > 1:
                        fail(f"asset {src_pat}: several files for one destination {dest}")
                    target = dest
                path = os.path.join(stage, target)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if re.match(r"usr/share/man/man\d/", target):
                    with open(src, "rb") as i, open(path + ".gz", "wb") as raw:
                        # mtime 0 and no file name: the same input gives the same bytes.
                        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                           compresslevel=9) as o:
                            shutil.copyfileobj(i, o)
                    path += ".gz"
                    target += ".gz"
                else:
                    shutil.copyfile(src, path)
                    if target.startswith("usr/bin/"):
                        # As cargo-deb does: no debug symbols in the package.
                        subprocess.run(["strip", "--strip-unneeded", path], check=True)
                os.chmod(path, int(mode, 8))
                installed.append(target)
        # A copyright file, as cargo-deb writes one from the license field.
        doc = os.path.join(stage, "usr/share/doc", name)
        os.makedirs(doc, exist_ok=True)
        with open(os.path.join(doc, "copyright"), "w") as f:
            f.write("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
                    f"Upstream-Name: {name}\n\nFiles: *\nCopyright: {meta.get('copyright', '')}\n"
                    f"License: {pkg['license']}\n")
        os.chmod(os.path.join(doc, "copyright"), 0o644)
        installed.append(f"usr/share/doc/{name}/copyright")

        debian = os.path.join(stage, "DEBIAN")
        os.makedirs(debian)
        conffiles = meta.get("conf-files", [])
        for c in conffiles:
            if c.lstrip("/") not in installed:
                fail(f"conf-file {c} is not among the assets")
        with open(os.path.join(debian, "conffiles"), "w") as f:
            f.write("".join(c + "\n" for c in conffiles))
        scripts = meta.get("maintainer-scripts")
        if scripts:
            for s in ("preinst", "postinst", "prerm", "postrm"):
                p = os.path.join(scripts, s)
                if os.path.exists(p):
                    shutil.copyfile(p, os.path.join(debian, s))
                    os.chmod(os.path.join(debian, s), 0o755)
        with open(os.path.join(debian, "md5sums"), "w") as f:
            for t in sorted(installed):
                with open(os.path.join(stage, t), "rb") as b:
                    f.write(f"{hashlib.md5(b.read()).hexdigest()}  {t}\n")

        depends = meta.get("depends", "$auto").replace("$auto", glibc_depends(args.binary))
        size_kb = sum(os.path.getsize(os.path.join(stage, t)) for t in installed) // 1024 + 1
        summary = pkg["description"]
        long = " " + meta.get("extended-description", summary).strip().replace("\n", "\n ")
        control = [
            f"Package: {name}",
            f"Version: {version}",
            f"Architecture: {arch}",
            f"Maintainer: {meta['maintainer']}",
            f"Installed-Size: {size_kb}",
            f"Depends: {depends}",
            f"Section: {meta.get('section', 'utils')}",
            f"Priority: {meta.get('priority', 'optional')}",
            f"Description: {summary}\n{long}",
        ]
        with open(os.path.join(debian, "control"), "w") as f:
            f.write("\n".join(control) + "\n")

        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, f"{name}_{version}_{arch}.deb")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, out],
                       check=True, stdout=subprocess.DEVNULL)
        print(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    main()
