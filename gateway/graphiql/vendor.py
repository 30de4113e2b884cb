"""Fetch GraphiQL's browser files from the npm registry, at build or install time.

`assets.lock.json` pins each npm package (name, version, the registry's `dist.integrity`)
and the files to take from its tarball. `fetch()` downloads each tarball, refuses it unless
its SHA-512 matches the lock (Subresource-Integrity format, as npm records it), and writes
the files under `dist/<package>-<version>/` with a gzip copy beside each, plus
`dist/manifest.json` (what is there, its hashes, and which lock it came from).

Standard library only: hatch_build.py loads this file by path inside pip's isolated build
environment, where neither the package nor its dependencies are installed. Also runnable
from a source checkout: ``python gateway/graphiql/vendor.py``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["VendorError", "DEFAULT_REGISTRY", "LOCK", "DIST", "registry_url", "fetch", "is_current"]

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
HERE = Path(__file__).resolve().parent
LOCK = HERE / "assets.lock.json"
DIST = HERE / "dist"
MANIFEST = "manifest.json"
TIMEOUT_S = 60.0
MAX_TARBALL_BYTES = 64 * 1024 * 1024


class VendorError(Exception):
    """The assets could not be fetched or did not match the lock."""


def registry_url(env: dict[str, str] | None = None) -> str:
    """The registry npm itself would use: NPM_CONFIG_REGISTRY, else `npm config get
    registry` when npm is installed, else the public registry."""
    env = dict(os.environ) if env is None else env
    url = env.get("NPM_CONFIG_REGISTRY") or env.get("npm_config_registry")
    if not url and shutil.which("npm"):
        try:
            out = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip().startswith(("http://", "https://")):
                url = out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            url = None
    url = url or DEFAULT_REGISTRY
    return url if url.endswith("/") else url + "/"


def slug(package: dict[str, Any]) -> str:
    """`@graphiql/plugin-explorer` 1.0.2 -> `graphiql-plugin-explorer-1.0.2`: one URL segment."""
    return f"{package['name'].lstrip('@').replace('/', '-')}-{package['version']}"


def tarball_url(registry: str, package: dict[str, Any]) -> str:
    # The registry's tarball layout: <name>/-/<unscoped name>-<version>.tgz
    name = package["name"]
    return f"{registry}{name}/-/{name.rsplit('/', 1)[-1]}-{package['version']}.tgz"


def _sri(algorithm: str, data: bytes) -> str:
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (https registry URL)
            data = response.read(MAX_TARBALL_BYTES + 1)
    except OSError as exc:  # URLError, HTTPError and socket timeouts are all OSErrors
        raise VendorError(f"cannot download {url}: {exc}") from exc
    if len(data) > MAX_TARBALL_BYTES:
        raise VendorError(f"{url} is larger than {MAX_TARBALL_BYTES} bytes")
    return data


def _lock_digest(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def _read_manifest(dist: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dist / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_current(lock: Path = LOCK, dist: Path = DIST) -> bool:
    """Whether `dist` holds exactly what `lock` pins (each file's hash checked)."""
    manifest = _read_manifest(dist)
    if not manifest or manifest.get("lock") != _lock_digest(lock):
        return False
    for path, meta in manifest.get("files", {}).items():
        try:
            if hashlib.sha256((dist / path).read_bytes()).hexdigest() != meta["sha256"]:
                return False
        except OSError:
            return False
    return True


def fetch(lock: Path = LOCK, dist: Path = DIST, registry: str | None = None) -> dict[str, Any]:
    """Download, verify and extract every locked package into `dist` (replaced whole,
    so a failure leaves the previous contents). Returns the manifest."""
    registry = registry or registry_url()
    pinned = json.loads(lock.read_text())["packages"]
    dist.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dist-", dir=dist.parent))
    try:
        files: dict[str, dict[str, str]] = {}
        for package in pinned:
            url = tarball_url(registry, package)
            data = _download(url)
            algorithm = package["integrity"].split("-", 1)[0]
            if algorithm != "sha512" or _sri("sha512", data) != package["integrity"]:
                raise VendorError(f"{url} does not match the integrity pinned in {lock.name}")
            folder = staging / slug(package)
            folder.mkdir()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                for inner, served in package["files"].items():
                    try:
                        member = archive.extractfile(f"package/{inner}")
                    except KeyError:
                        member = None
                    if member is None:
                        raise VendorError(f"{package['name']}@{package['version']} has no file {inner}")
                    content = member.read()
                    (folder / served).write_bytes(content)
                    # mtime=0: the same bytes on every build.
                    (folder / f"{served}.gz").write_bytes(gzip.compress(content, 9, mtime=0))
                    files[f"{slug(package)}/{served}"] = {
                        "sha256": hashlib.sha256(content).hexdigest(),
                        "integrity": _sri("sha384", content),
                    }
        manifest = {"lock": _lock_digest(lock), "registry": registry, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if dist.exists():
            shutil.rmtree(dist)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a non-root user (the image's)
        staging.rename(dist)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    if is_current():
        print(f"GraphiQL assets in {DIST} are current")
        return 0
    try:
        manifest = fetch()
    except VendorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"GraphiQL assets: {len(manifest['files'])} files from {manifest['registry']} into {DIST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
