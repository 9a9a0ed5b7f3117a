"""Calibration and evaluation text: a .txt file, a .jsonl file with a "text" field, a folder of
them, or one of the built-in offline sources.

Built-in sources (English, on every machine qdtk installs on, no network), each a list of
documents in a fixed order, split at the document boundary nearest to 80% of its characters:
the first part may calibrate, the rest is held out for evaluation, so the two never overlap.

    pydoc       Python's language reference topics (the standard library's pydoc_data.topics)
    docstrings  the docstrings of a fixed list of standard-library modules (API documentation)
    manpages    the Linux man-pages project's section 7 overviews (Debian's `manpages`,
                installed with the OS image), troff markup stripped

`--calib builtin` is the calibration mix (CALIB_MIX: the calibration parts of these sources,
each cut to at most MIX_CHARS characters so no source dominates); `builtin:NAME` is one
source: its calibration part for calibration, its held-out part for evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import re
from functools import cache
from pathlib import Path

from qdtk.errors import QdtkError

BUILTIN = "builtin"
PREFIX = BUILTIN + ":"
CALIB_FRACTION = 0.8  # of a built-in source's characters, rounded to a document boundary
SEPARATOR = "\n\n"
SPLITS = ("calib", "heldout")

# Standard-library modules whose docstrings form the "docstrings" source: pure-Python, present
# on every CPython build, importable without side effects.
DOCSTRING_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "logging.handlers", "lzma",
    "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)

MANPAGE_DIR = Path("/usr/share/man/man7")
# Section 7 pages of the man-pages project that are prose (not character-set tables).
MANPAGES = (
    "address_families", "aio", "arp", "attributes", "boot", "bootparam", "capabilities",
    "cgroup_namespaces", "cgroups", "complex", "cpuset", "credentials", "ddp", "environ",
    "epoll", "fanotify", "feature_test_macros", "fifo", "futex", "glob", "hier", "hostname",
    "icmp", "inode", "inotify", "intro", "ip", "ipc_namespaces", "ipv6", "kernel_lockdown",
    "keyrings", "landlock", "libc", "locale", "mailaddr", "math_error", "mount_namespaces",
    "mq_overview", "namespaces", "netdevice", "netlink", "network_namespaces", "nptl", "numa",
    "packet", "path_resolution", "persistent-keyring", "pid_namespaces", "pipe", "pkeys",
    "posixoptions", "process-keyring", "pthreads", "pty", "random", "raw", "regex",
    "rtld-audit", "rtnetlink", "sched", "sem_overview", "session-keyring", "shm_overview",
    "sigevent", "signal-safety", "signal", "sock_diag", "socket", "spufs", "standards",
    "string_copying", "suffixes", "symlink", "sysvipc", "tcp", "termio", "thread-keyring",
    "time", "time_namespaces", "udp", "udplite", "units", "unix", "user-keyring",
    "user-session-keyring", "user_namespaces", "uts_namespaces", "vdso", "vsock", "x25", "xattr",
)


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _own_doc(obj) -> str:
    """obj's own docstring, cleaned (inspect.getdoc would inherit a base class's)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _module_docstrings(name: str, seen: set[str]) -> str:
    """A module's docstring and those of its public classes, functions and methods, leaving
    out any text already in `seen` (shared docstrings would cross the calibration split)."""
    import importlib

    module = importlib.import_module(name)
    parts = [_own_doc(module)]
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        parts.append(_own_doc(obj))
        if inspect.isclass(obj):
            parts += [_own_doc(f) for k, f in sorted(vars(obj).items())
                      if not k.startswith("_") and inspect.isfunction(f)]
    fresh = []
    for part in parts:
        if part.strip() and part not in seen:
            seen.add(part)
            fresh.append(part)
    return SEPARATOR.join(fresh)


def _docstring_documents() -> list[str]:
    import warnings

    seen: set[str] = set()
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when read
        warnings.simplefilter("ignore", DeprecationWarning)
        docs = [_module_docstrings(name, seen) for name in DOCSTRING_MODULES]
    return [d for d in docs if d]


_FONT_MACROS = {"B": " ", "I": " ", "SM": " ", "BR": "", "RB": "", "IR": "", "RI": "", "BI": "",
                "IB": ""}  # macro -> how its arguments are joined (alternating fonts: no space)
_BREAK_MACROS = {"PP", "P", "LP", "SH", "SS", "TP", "IP", "HP"}
_ESCAPES = {r"\-": "-", r"\(em": " - ", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"',
            r"\(rq": '"', r"\(bu": "*", r"\e": "\\", r"\&": "", r"\ ": " ", r"\~": " ",
            r"\|": "", r"\^": "", r"\0": " ", r"\(co": "(c)", r"\(mu": "x", r"\(>=": ">=",
            r"\(<=": "<="}
_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))
# what is left after the named escapes: fonts, sizes, strings, other glyphs
_NAMED = r"(\(..|\[[^]]*\]|.)"  # one glyph or string name: x, (xx or [name]
_OTHER_ESCAPES = re.compile(rf"\\(f{_NAMED}|s[-+]?\d|\*{_NAMED}|\(..|\[[^]]*\]|.)")


def troff_to_text(src: str) -> str:
    """Plain prose from a man page's troff source: requests dropped (the text arguments of
    headings and font macros kept), escapes replaced, tables and comments left out."""
    out: list[str] = []
    in_table = False
    for line in src.splitlines():
        if line.startswith(".TS"):
            in_table = True
        if in_table:
            in_table = not line.startswith(".TE")
            continue
        if line.startswith(("'", '.\\"', "\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in _BREAK_MACROS:
                out.append("")
            if macro in _FONT_MACROS or macro in ("SH", "SS"):
                args = re.findall(r'"([^"]*)"|(\S+)', rest)
                out.append(_FONT_MACROS.get(macro, " ").join(a or b for a, b in args))
            continue
        out.append(line)
    text = "\n".join(out)
    text = _OTHER_ESCAPES.sub("", _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text))
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return SEPARATOR.join(p for p in paragraphs if p)


def _manpage_documents() -> list[str]:
    files = [MANPAGE_DIR / f"{name}.7.gz" for name in MANPAGES]
    files = [f for f in files if f.is_file()]
    if not files:
        raise QdtkError(f"{MANPAGE_DIR}: none of the man-pages section 7 pages is installed "
                        f"(Debian: apt-get install manpages)")
    return [troff_to_text(gzip.decompress(f.read_bytes()).decode("utf-8", "replace"))
            for f in files]


SOURCES = {"pydoc": _pydoc_documents, "docstrings": _docstring_documents,
           "manpages": _manpage_documents}
# The default calibration (`--calib builtin`) and evaluation (`--eval-text` unset) sources.
# pydoc + docstrings: on MiniLM it raised the embedding cosine on the never-calibrated manpages
# 0.841 -> 0.869 at 0.876 -> 0.875 on pydoc; manpages stays out, an unseen domain to check on.
CALIB_MIX = ("pydoc", "docstrings")
EVAL_SOURCES = ("pydoc", "docstrings", "manpages")
MIX_CHARS = 400_000  # at most this much of each source in the calibration mix


def split_documents(docs: list[str], split: str) -> list[str]:
    """The first ~CALIB_FRACTION of the documents' characters ("calib") or the rest
    ("heldout"), cut at the document boundary nearest to the fraction."""
    if split not in SPLITS:
        raise QdtkError(f"unknown built-in split {split!r} (calib or heldout)")
    total = sum(len(d) for d in docs)
    acc, cut = 0, len(docs)
    for i, d in enumerate(docs):
        if acc + len(d) / 2 >= CALIB_FRACTION * total:  # document i is mostly beyond the cut
            cut = i
            break
        acc += len(d)
    return docs[:cut] if split == "calib" else docs[cut:]


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise QdtkError(f"unknown built-in text {PREFIX}{source} "
                        f"(one of {', '.join(PREFIX + s for s in SOURCES)})")
    return source


@cache
def builtin_documents(source: str, split: str) -> tuple[str, ...]:
    """One built-in source's documents of one split (cached: the docstrings import modules)."""
    return tuple(split_documents(SOURCES[_check_source(source)](), split))


def builtin_text(split: str = "calib", source: str = "pydoc") -> str:
    """A built-in source's text: split "calib" (first ~80%) or "heldout" (the rest)."""
    return SEPARATOR.join(builtin_documents(source, split))


def truncate_documents(docs: tuple[str, ...], limit: int) -> list[str]:
    """The leading documents whose characters fit `limit`, the last one cut to fit."""
    out, left = [], limit
    for d in docs:
        if left <= 0:
            break
        out.append(d[:left])
        left -= len(d)
    return out


def mix_documents(sources: tuple[str, ...], limit: int = MIX_CHARS) -> list[str]:
    """The calibration parts of `sources`, each cut to `limit` characters, in turn."""
    return [d for s in sources for d in truncate_documents(builtin_documents(s, "calib"), limit)]


def builtin_name(source: str | Path | None) -> str | None:
    """"builtin" for the built-in mix, NAME for "builtin:NAME", None for a path."""
    if source is None or str(source) == BUILTIN:
        return BUILTIN
    if str(source).startswith(PREFIX):
        return _check_source(str(source)[len(PREFIX):])
    return None


def check_text_source(source: str | Path) -> None:
    """Raise QdtkError unless `source` names a built-in text or an existing path (cheap: for
    options checked before a long run)."""
    if builtin_name(source) is None and not Path(source).exists():
        raise QdtkError(f"{source}: text source not found")


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QdtkError(f"{path}:{line_no}: not valid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise QdtkError(f'{path}:{line_no}: no string field "text"')
            docs.append(text)
    return docs


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise QdtkError(f"{path}: not UTF-8 text ({e})") from None
    raise QdtkError(f"{path}: calibration files must be .txt or .jsonl")


def file_documents(path: Path) -> list[str]:
    """The non-empty documents of a .txt / .jsonl file or a folder of them."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise QdtkError(f"{path}: folder holds no .txt or .jsonl files")
        docs = [d for p in files for d in _read_file(p)]
    elif path.is_file():
        docs = _read_file(path)
    else:
        raise QdtkError(f"{path}: text source not found")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QdtkError(f"{path}: text source holds no text")
    return docs


def calibration_documents(source: str | Path | None) -> list[str]:
    """The documents of a calibration source: None or "builtin" the calibration mix,
    "builtin:NAME" that source's calibration part, else a file or folder."""
    name = builtin_name(source)
    if name == BUILTIN:
        return mix_documents(CALIB_MIX)
    if name is not None:
        return list(builtin_documents(name, "calib"))
    return file_documents(Path(source))


def calibration_text(source: str | Path | None) -> str:
    """All documents of a source joined by blank lines: the stream windows are cut from."""
    return SEPARATOR.join(calibration_documents(source))


def text_hash(text: str) -> str:
    """What a stats manifest records of its calibration text ("sha256", 16 hex digits), and what
    the model-scope pre-pass checks a file against before it measures on it again."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluation_text(source: str | Path) -> str:
    """The text of an evaluation source: "builtin:NAME" that source's held-out part (never
    calibrated on), else a file or folder."""
    name = builtin_name(source)
    if name == BUILTIN:
        raise QdtkError(f"evaluate on one built-in source: "
                        f"{', '.join(PREFIX + s for s in SOURCES)}")
    if name is not None:
        return builtin_text("heldout", name)
    return SEPARATOR.join(file_documents(Path(source)))
