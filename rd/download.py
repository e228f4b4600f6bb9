"""``python -m rd download mvtec``: fetch, verify and safely unpack the MVTec AD archives.

The archives are large, hosted by MVTec and licensed for non-commercial use only, so the
command says so before fetching, resumes a broken download instead of starting over, checks
every archive against its recorded SHA-256, and unpacks without letting any member land
outside the chosen root. A half-finished download or extraction never looks finished: bytes
go to ``<file>.part`` and folders to a hidden staging folder of this run (two runs never share
one) until they are complete. An archive may unpack to at most ``MAX_UNPACK_RATIO`` times its own
size (at least ``MIN_UNPACK_CAP``), so a small archive cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from rd.errors import RDError

LICENCE = ("MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial use only; attribution: "
           "Bergmann et al., CVPR 2019): https://www.mvtec.com/company/research/datasets/mvtec-ad")
BASE_URL_ENV = "RD_MVTEC_BASE_URL"
LAYOUT = "train/good"  # every MVTec category folder has it; its absence means a wrong archive
BACKOFF_S = 1.0  # pause before the first retry, doubled for each further one
CHUNK = 1 << 20
USER_AGENT = "rd-studio (Python urllib)"
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   TimeoutError, ssl.SSLError)
# The stdlib's "data" filter (Python >= 3.10.12 / 3.11.4) backs up our own member check.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())
# Unpacked bytes allowed per byte of archive (MVTec's PNGs barely compress: about 1.1), and the
# least allowed for small archives. Kept tight: besides the disk, a stream of zeros costs
# Python's tarfile quadratic time to read (40 MB of zeros in a 6 KB .tar.xz: a minute).
MAX_UNPACK_RATIO = 20
MIN_UNPACK_CAP = 8 << 20
STAGING_PREFIX = ".extracting-"


class DownloadError(RDError, RuntimeError, OSError):
    """A download or extraction failed; the message says what to do (an OSError for the CLI)."""


def unpack_cap(archive: Path) -> int:
    """The default most bytes ``archive`` may unpack to."""
    return max(MAX_UNPACK_RATIO * Path(archive).stat().st_size, MIN_UNPACK_CAP)


class UnpackBudget:
    """Counts the bytes an archive's members will take, refusing past ``cap`` before writing."""

    def __init__(self, archive: Path, cap: int | None = None) -> None:
        self.archive = Path(archive)
        self.cap = unpack_cap(archive) if cap is None else cap
        self.used = 0

    def take(self, member: tarfile.TarInfo) -> None:
        self.used += max(member.size, 0) if member.isfile() else 0
        if self.used > self.cap:
            size = (f"{self.cap / 1e9:.1f} GB" if self.cap >= 1e9 else
                    f"{self.cap / 1e6:.1f} MB")
            raise DownloadError(f"{self.archive} unpacks to more than {size} "
                                f"(member {member.name!r} passes it): not the expected archive; "
                                "nothing was installed")


@dataclass(frozen=True)
class Archive:
    """One official per-category archive and what it must be."""

    url: str
    sha256: str
    mib: int  # rounded size, for the message before downloading
    size: int | None = None  # exact bytes where recorded: a different offer fails at once


def _mydrive(share: str, file_id: str, category: str) -> str:
    return f"https://www.mydrive.ch/shares/{share}/download/{file_id}/{category}.tar.xz"


# Links as listed on MVTec's download page (https://www.mvtec.com/company/research/datasets/
# mvtec-ad/downloads); SHA-256 and sizes as recorded for the same files in public projects.
ARCHIVES: dict[str, Archive] = {
    "bottle": Archive(
        _mydrive("150452/132a93367fb17cdf968dfb5c4013f6e7", "420937370-1629958698", "bottle"),
        "726512129cb3b1f47d4f6cd7c7fc9170db7fc209132249c788fec06029cb5dc3", 148, 155_880_244),
    "cable": Archive(
        _mydrive("150453/10f960e07fec2838b2cd512586633a32", "420937413-1629958794", "cable"),
        "1e3d59b80a6a8da5adf32fb0cf311c7b964cde146d6920aef9ca66380999a9cd", 481),
    "capsule": Archive(
        _mydrive("150454/e0ce6dd74eb150f46c0d98131b3703f2", "420937454-1629958872", "capsule"),
        "f6a41cb11f1589d552888fe9c43a1adcbcae15b70073e19093322f836d00a2b6", 385),
    "carpet": Archive(
        _mydrive("150455/eac7fbce84d93a5094e13f391170eca4", "420937484-1629959013", "carpet"),
        "d9dd5064515a20bd75cf24d223c570579141abd72388beef892780b74dbaa85d", 705),
    "grid": Archive(
        _mydrive("150456/bb0b2e3dc804ccb8b4485e01f8e4493b", "420937487-1629959044", "grid"),
        "d94a9a651cbfaee22c94d06cf8fa8204a590c872362de0489eb34f1645328de8", 153, 160_763_852),
    "hazelnut": Archive(
        _mydrive("150457/51d49f65e84bdc100ff8035d7dd783ea", "420937545-1629959162", "hazelnut"),
        "a7f4e7d65a60a235def7236a46fcb854d62e6c6917c16b1ec9cb4ff089d3b0da", 588),
    "leather": Archive(
        _mydrive("150458/923030ce14e10a7d147e95d0f8885f6b", "420937607-1629959262", "leather"),
        "704ffa48b1dc2fc44824aa50442d9febc399dd92a5d6fd8156f8aa0373d15f24", 500),
    "metal_nut": Archive(
        _mydrive("150459/c68856a21dca589b0f8ff6d4ee0f18f4", "420937637-1629959294", "metal_nut"),
        "86e3c8e163ceb19146ad3ddc408e85cc34ae02e0da430e07a73bac6bbb48532a", 157, 165_414_484),
    "pill": Archive(
        _mydrive("150460/d4f1c04da67034ccc8d8b5fa3e73f244", "420938129-1629960351", "pill"),
        "ac6ce9ec4ec2a5d67c906d82147bd7431980cf00b78f25d63201a5f17e3a2038", 262),
    "screw": Archive(
        _mydrive("150461/242f454cc6385e5693c4fd4b94567d1e", "420938130-1629960389", "screw"),
        "0a27a365a21e472d19b9fb48cb8e4002b49fabe083bff7f4c16fa57d78154f10", 186, 195_344_332),
    "tile": Archive(
        _mydrive("150462/5479f0fdc97bc6fa16eab0cb0cf0109f", "420938133-1629960456", "tile"),
        "392228153b96d0db9f179d3f7c2d63e131e907154883b57309fcbf798643173c", 335),
    "toothbrush": Archive(
        _mydrive("150463/895a1a5fb84b958f07417784b060434b", "420938134-1629960477", "toothbrush"),
        "fe72a34b4b0d074f84e844be7ef8c4f64f7f02f20e25f19c9e3b4a231c8bea77", 104),
    "transistor": Archive(
        _mydrive("150464/99b8ea0332438d64fcc2475ee73f9c29", "420938166-1629960554", "transistor"),
        "146b2166c35a1d0cf37ded091366ac01a50338b4ac704632f1239890eaca4449", 384),
    "wood": Archive(
        _mydrive("150465/d5b4115b720cdb54d217e75636e6e374", "420938383-1629960649", "wood"),
        "3757297ac2a266072eb4f25a97f805f5b37fd583492b20bd709f310736c1ea47", 474),
    "zipper": Archive(
        _mydrive("150466/bd155b557520edaf692d9bfdb915c24a", "420938385-1629960680", "zipper"),
        "7ab46e0e195da145db30052baea3d3a5d14c5f0e710137c968e0423f02cb942d", 152, 159_484_784),
}


# ------------------------------------------------------------------------------ download


def download_file(url: str, dest: Path, expected_size: int | None = None,
                  sha256: str | None = None, progress: bool = True, timeout: float = 30,
                  retries: int = 3) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part``: resume, retry, verify, then rename.

    A broken connection keeps the ``.part`` file, so the next try (or the next run) asks only
    for the rest with an HTTP Range request; a server that answers 200 instead of 206 is
    downloaded from zero. A wrong size or checksum deletes the ``.part``: resuming it would
    keep the bad bytes. An existing ``dest`` is verified and reused.
    """
    dest = Path(dest)
    if dest.exists():
        _verify(dest, expected_size, sha256, downloaded=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failure: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            _fetch(url, part, expected_size, progress, timeout)
            break
        except _NETWORK_ERRORS as error:
            failure = error
    else:
        host = urlsplit(url).hostname or url
        received = part.stat().st_size if part.exists() else 0
        if received:
            raise DownloadError(f"download from {host} broke off after {received:,} bytes "
                                f"({retries + 1} tries, last: {failure}): run the same command "
                                "again to resume")
        raise DownloadError(f"cannot reach {host} ({failure}): check your connection, or "
                            "download the archive manually and pass --archive FILE")
    _verify(part, expected_size, sha256, downloaded=True)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, expected_size: int | None, progress: bool,
           timeout: float) -> None:
    """One attempt: append the rest of the body to ``part``, or rewrite it from zero."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset >= expected_size:
        if offset == expected_size:
            return
        part.unlink()
        offset = 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    host = urlsplit(url).hostname or url
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # nothing past offset: complete, or a stale .part
            if _content_range(error.headers.get("Content-Range", ""))[1] == offset:
                return
            part.unlink()
            raise ConnectionError("the server refused to resume; starting again") from error
        if error.code >= 500:
            raise
        raise DownloadError(f"{host} answered HTTP {error.code} for {url}: the link may have "
                            "moved; download the archive from MVTec's page and pass --archive "
                            "FILE") from error
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise ConnectionError(f"the server resumed at byte {start}, not {offset}")
        else:  # 200: the server sends everything (it ignored or lacks Range support)
            offset = 0
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{host} offers {total:,} bytes for {part.stem}, expected "
                                f"{expected_size:,}: the file has changed; download it by hand "
                                "and pass --archive FILE")
        received = offset
        with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, desc=part.stem, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not progress, leave=False) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received:,} of {total:,} bytes")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (START, TOTAL); None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _verify(path: Path, expected_size: int | None, sha256: str | None, downloaded: bool
            ) -> None:
    """Raise unless ``path`` has the expected size and SHA-256; delete a bad download."""
    size = path.stat().st_size
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"{size:,} bytes, expected {expected_size:,}"
    elif sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            problem = f"SHA-256 {digest.hexdigest()}, expected {sha256.lower()}"
    if problem is None:
        return
    if downloaded:
        path.unlink()
        raise DownloadError(f"the download of {path.stem} is damaged ({problem}); it was "
                            "deleted: run the command again")
    raise DownloadError(f"{path} is damaged ({problem}): delete it and download again")


# ------------------------------------------------------------------------------- extract


def safe_extract(archive: Path, root: Path, folders: Collection[str] | None = None,
                 must_contain: str = LAYOUT, max_unpacked: int | None = None) -> list[Path]:
    """Unpack the top-level ``folders`` (default: all) of a tar archive into ``root``.

    Every member is checked before it is written: an absolute path, a path or link leading
    outside, a device file, or members adding up to more than ``max_unpacked`` bytes (default
    ``unpack_cap``) refuse the whole archive, naming the member. Members go to a staging folder
    of this run under ``root``; each folder is renamed into place only once the whole archive
    has been read and it holds ``must_contain``, so nothing half-unpacked is ever found at
    ``root/<folder>``.
    """
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    try:
        found = _extract_checked(archive, staging, folders, UnpackBudget(archive, max_unpacked))
        wanted = list(folders) if folders is not None else sorted(found)
        if not wanted:
            raise DownloadError(f"{archive} holds no folder to unpack")
        for name in wanted:
            if not (staging / name / must_contain).is_dir():
                raise DownloadError(f"{archive.name} holds no {name}/{must_contain}: it is not "
                                    f"the expected archive")
            if (root / name).exists():
                raise DownloadError(f"{root / name} already exists but is incomplete: delete "
                                    "it and run again")
        for name in wanted:
            (staging / name).rename(root / name)
        return [root / name for name in wanted]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned_staging(root: Path) -> None:
    """Delete staging folders whose run has ended (killed runs); running ones stay."""
    for folder in root.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).partition("-")[0]
        if folder.is_dir() and not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _extract_checked(archive: Path, staging: Path, folders: Collection[str] | None,
                     budget: UnpackBudget) -> set[str]:
    """Stream the archive once, checking then writing each wanted member; top-level names."""
    base = staging.resolve()
    found: set[str] = set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                _check_member(member, base, archive)
                budget.take(member)  # skipped members too: their bytes are read all the same
                parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                if not parts or (len(parts) == 1 and not member.isdir()):
                    continue  # the archive's own root entry, or a loose top-level file
                if folders is not None and parts[0] not in folders:
                    continue
                found.add(parts[0])
                tar.extract(member, staging, **_DATA_FILTER)
    except _FILTER_ERROR as error:
        raise DownloadError(f"unsafe archive {archive}: {error}; nothing was installed"
                            ) from error
    except tarfile.TarError as error:
        raise DownloadError(f"archive is corrupt: delete {archive} and download again "
                            f"({error})") from error
    return found


def _check_member(member: tarfile.TarInfo, base: Path, archive: Path) -> None:
    """Refuse a member that would write, or link, outside ``base``."""
    why = None
    if member.name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member.name):
        why = "has an absolute path"
    elif not _inside(base / member.name, base):
        why = "leads outside the target folder"
    elif member.issym():
        if not _inside(base / PurePosixPath(member.name).parent / member.linkname, base):
            why = f"is a symlink to {member.linkname!r}, outside the target folder"
    elif member.islnk():
        if not _inside(base / member.linkname, base):
            why = f"is a hard link to {member.linkname!r}, outside the target folder"
    elif not (member.isfile() or member.isdir()):
        why = "is a device or other special file"
    if why is not None:
        raise DownloadError(f"unsafe archive {archive}: member {member.name!r} {why}; nothing "
                            "was installed")


def _inside(path: Path, base: Path) -> bool:
    """Whether ``path``, with links already on disk followed, stays within ``base``."""
    return Path(os.path.realpath(path)).is_relative_to(base)


# --------------------------------------------------------------------------------- MVTec


def download_mvtec(root: Path, categories: Iterable[str] | None = None,
                   base_url: str | None = None, progress: bool = True,
                   archive: Path | None = None, max_unpacked: int | None = None) -> list[Path]:
    """Make ``root/<category>`` for each category: download, verify and unpack what is missing.

    ``categories`` defaults to all 15 (with ``archive``: the one it is named after, else all).
    ``base_url`` (or ``$RD_MVTEC_BASE_URL``) replaces MVTec's links by ``<base_url>/<c>.tar.xz``,
    a mirror; the recorded checksums still apply. ``archive`` unpacks an already downloaded
    archive (one category's, or the full ``mvtec_anomaly_detection.tar.xz``) instead and
    keeps it; a downloaded archive is deleted once unpacked. ``max_unpacked`` caps the bytes
    each archive may unpack to (default: ``unpack_cap``). Returns the category folders.
    """
    root, archive = Path(root), None if archive is None else Path(archive)
    if categories is None:
        stem = archive.name.split(".")[0] if archive is not None else None
        categories = [stem] if stem in ARCHIVES else list(ARCHIVES)
    categories = list(dict.fromkeys(categories))
    unknown = [c for c in categories if c not in ARCHIVES]
    if unknown:
        raise DownloadError(f"unknown MVTec AD category {unknown[0]!r}: choose from "
                            f"{', '.join(ARCHIVES)}")
    missing = []
    for category in categories:
        if (root / category / LAYOUT).is_dir():
            print(f"{category}: already in {root / category}, skipped")
        else:
            missing.append(category)
    if not missing:
        return [root / c for c in categories]
    print(LICENCE)
    root.mkdir(parents=True, exist_ok=True)
    if archive is not None:
        if not archive.is_file():
            raise DownloadError(f"{archive} is not a file: give the downloaded .tar.xz")
        print(f"unpacking {', '.join(missing)} from {archive}")
        safe_extract(archive, root, missing, max_unpacked=max_unpacked)
        return [root / c for c in categories]
    base = base_url or os.environ.get(BASE_URL_ENV)
    urls = {c: ARCHIVES[c].url for c in missing}
    if base:
        urls = {c: f"{base.rstrip('/')}/{PurePosixPath(urlsplit(u).path).name}"
                for c, u in urls.items()}
    print(f"downloading {len(missing)} archive(s), about {total_size(missing)}, from "
          f"{urlsplit(urls[missing[0]]).hostname} into {root}")
    for category in missing:
        entry = ARCHIVES[category]
        file = download_file(urls[category], root / f"{category}.tar.xz", entry.size,
                             entry.sha256, progress)
        safe_extract(file, root, [category], max_unpacked=max_unpacked)
        file.unlink()
        print(f"{category}: ready in {root / category}")
    return [root / c for c in categories]


def total_size(categories: Iterable[str]) -> str:
    """The archives' total size in round decimal units, for the message before fetching."""
    total = sum(ARCHIVES[c].size or ARCHIVES[c].mib << 20 for c in categories)
    return f"{total / 1e9:.1f} GB" if total >= 1e9 else f"{total / 1e6:.0f} MB"
