"""Licence expressions -> SPDX identifiers -> the licence classes of SILO's Open License Corpus.

SILO (Min et al., 2023, "SILO Language Models: Isolating Legal Risk In a Nonparametric Datastore",
arXiv:2308.04430) trains only on the Open License Corpus, whose text it sorts by licence (its OLC table
and Section 3): public domain (PD), permissively licensed software (SW) and attribution licences (BY).
We add the classes a harvester needs to keep the rest apart: ``copyleft``, ``noncommercial`` and
``unknown``. :func:`classify` reads everything a harvester meets and never raises:

- SPDX licence expressions with ``OR`` / ``AND`` / ``WITH``, ``+`` and parentheses (SPDX spec annex D;
  :class:`_ExpressionParser` says why we parse them ourselves);
- Debian short names from copyright-format 1.0 (DEP-5) ``License:`` fields (``Expat``, ``GPL-2+``,
  ``BSD-3-clause``, ``public-domain``, ``Perl``...), including DEP-5's lower-case ``or``/``and`` and its
  comma rule (``A or B, and C`` means ``(A or B) and C``);
- PyPI trove classifiers (``License :: OSI Approved :: MIT License``) via :func:`from_classifiers`;
- free-text licence names (``Apache License, Version 2.0``, ``GPLv3+``) and whole licence texts
  (a LICENSE file, a non-DEP-5 Debian copyright file) via :func:`from_license_text`.

Policy (:data:`POLICY`): an ``OR`` takes its most permissive branch (the user may choose it), an ``AND``
its most restrictive; ``WITH`` keeps the base licence's class when the exception is a known SPDX one
(or a DEP-5 keyword naming one, :data:`DEBIAN_EXCEPTIONS`; an exception only adds permissions) and is
``unknown`` otherwise; anything not recognised is ``unknown``, the most restrictive class, so it is never
treated as permissive. :func:`policy_markdown` renders the policy and the full mapping table for README.

Sources of the mapping table (:data:`SOURCES`): the SPDX License List and exceptions list (identifiers),
the Debian copyright-format 1.0 specification (short names), PyPI's trove classifier list, and SILO's
OLC table (which licences count as PD / SW / BY). Deviations from SILO: CC-BY-ND licences are put with
``noncommercial`` (both forbid uses that training needs), and licences with conditions on modified
versions (Artistic, LPPL, OFL, MPL, EPL...) are put with ``copyleft``, the conservative side.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class LicenseClass(StrEnum):
    """Licence classes, from the least to the most restrictive (the order is the policy's ranking)."""

    PUBLIC_DOMAIN = "public_domain"
    PERMISSIVE_SW = "permissive_sw"
    ATTRIBUTION = "attribution"
    COPYLEFT = "copyleft"
    NONCOMMERCIAL = "noncommercial"
    UNKNOWN = "unknown"

    @property
    def rank(self) -> int:
        """0 for public domain ... 5 for unknown: OR takes the minimum, AND the maximum."""
        return _ORDER.index(self)


_ORDER = list(LicenseClass)
PERMISSIVE_CLASSES = frozenset({LicenseClass.PUBLIC_DOMAIN, LicenseClass.PERMISSIVE_SW, LicenseClass.ATTRIBUTION})

NOASSERTION = "NOASSERTION"  # SPDX's word for "no licence information"
AMBIGUOUS = "LicenseRef-ambiguous"  # a licence text that names licences of different classes

SOURCES = {
    "SPDX": "SPDX License List 3.x and exceptions list, https://spdx.org/licenses/",
    "DEP-5": "Debian copyright-format 1.0, section 'License specification' (short names), "
             "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
    "PyPI": "PyPI trove classifiers, 'License ::' entries, https://pypi.org/classifiers/",
    "SILO": "Min et al. 2023, SILO (arXiv:2308.04430), Open License Corpus table: PD / SW / BY categories",
}

POLICY = (
    "An `OR` expression takes its most permissive branch and an `AND` its most restrictive one; `WITH` keeps the "
    "base licence's class for a known SPDX exception (exceptions only add permissions).",
    "Anything not recognised is `unknown`, the most restrictive class: it is never treated as permissive, and "
    "SILO-style training uses only `public_domain`, `permissive_sw` and (optionally) `attribution`.",
    "Debian short names, PyPI classifiers and free-text names are first normalised to SPDX identifiers; several "
    "licence classifiers on one package are combined with `AND`, and a licence text naming licences of different "
    "classes is `unknown` (`LicenseRef-ambiguous`).",
)


@dataclass(frozen=True)
class License:
    """A classified licence: an SPDX expression (or ``LicenseRef-...``/``NOASSERTION``) and its class."""

    expression: str
    license_class: LicenseClass

    @property
    def is_permissive(self) -> bool:
        return self.license_class in PERMISSIVE_CLASSES


UNKNOWN = License(NOASSERTION, LicenseClass.UNKNOWN)


@dataclass(frozen=True)
class LicenseRule:
    """One row of the mapping table: SPDX identifiers that share a class, and where that comes from."""

    license_class: LicenseClass
    ids: tuple[str, ...]
    source: str
    note: str = ""


def _versions(stem: str, versions: Iterable[str], suffixes: Iterable[str] = ("",)) -> tuple[str, ...]:
    return tuple(f"{stem}-{v}{s}" for v in versions for s in suffixes)


_CC = ("1.0", "2.0", "2.5", "3.0", "4.0")
_GNU = ("-only", "-or-later")

RULES: tuple[LicenseRule, ...] = (
    LicenseRule(LicenseClass.PUBLIC_DOMAIN,
                ("LicenseRef-public-domain", "CC0-1.0", "Unlicense", "CC-PDDC", "PDDL-1.0"),
                "SILO (PD); SPDX; DEP-5 `public-domain`; PyPI `License :: Public Domain`"),
    LicenseRule(LicenseClass.PERMISSIVE_SW,
                ("MIT", "MIT-0", "X11", "MIT-CMU", "0BSD", "BSD-1-Clause", "BSD-2-Clause", "BSD-2-Clause-Patent",
                 "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "LicenseRef-BSD", "Apache-1.0", "Apache-1.1",
                 "Apache-2.0", "ISC", "PSF-2.0", "Python-2.0", "Python-2.0.1", "CNRI-Python", "Zlib",
                 "zlib-acknowledgement", "Libpng", "libpng-2.0", "BSL-1.0", "curl", "HPND", "HPND-sell-variant",
                 "ICU", "Unicode-DFS-2015", "Unicode-DFS-2016", "Unicode-3.0", "W3C", "W3C-20150513", "ZPL-2.0",
                 "ZPL-2.1", "NCSA", "PostgreSQL", "OpenSSL", "IJG", "FTL", "bzip2-1.0.6", "Info-ZIP",
                 "BlueOak-1.0.0", "UPL-1.0", "WTFPL", "AFL-2.1", "AFL-3.0", "EFL-2.0", "Beerware", "TCL", "MirOS",
                 "Spencer-94", "SMLNJ", "FSFAP", "FSFUL", "FSFULLR"),
                "SILO (SW); SPDX; DEP-5 `Expat`, `BSD-n-clause`, `ISC`, `Zlib`...",
                "`LicenseRef-BSD`: a BSD licence whose clause count is not stated (PyPI `BSD License`)"),
    LicenseRule(LicenseClass.ATTRIBUTION,
                _versions("CC-BY", _CC) + ("ODC-By-1.0", "CDLA-Permissive-1.0", "CDLA-Permissive-2.0"),
                "SILO (BY); SPDX"),
    LicenseRule(LicenseClass.COPYLEFT,
                _versions("GPL", ("1.0", "2.0", "3.0"), _GNU) + _versions("LGPL", ("2.0", "2.1", "3.0"), _GNU)
                + _versions("AGPL", ("1.0", "3.0"), _GNU)
                + _versions("GFDL", ("1.1", "1.2", "1.3"), ("-only", "-or-later", "-invariants-only",
                                                          "-invariants-or-later", "-no-invariants-only",
                                                          "-no-invariants-or-later"))
                + _versions("CC-BY-SA", _CC)
                + ("MPL-1.0", "MPL-1.1", "MPL-2.0", "MPL-2.0-no-copyleft-exception", "EPL-1.0", "EPL-2.0",
                   "CPL-1.0", "CDDL-1.0", "CDDL-1.1", "EUPL-1.1", "EUPL-1.2", "OSL-3.0", "ODbL-1.0", "OFL-1.0",
                   "OFL-1.1", "LPPL-1.3a", "LPPL-1.3c", "Artistic-1.0", "Artistic-1.0-Perl", "Artistic-2.0",
                   "QPL-1.0", "Sleepycat", "CECILL-2.1", "APSL-2.0", "Vim", "Ruby"),
                "SPDX; DEP-5 `GPL-2+`, `LGPL-2.1+`, `GFDL-NIV-1.2`, `Artistic`, `MPL`...",
                "weak copyleft and licences with conditions on modified versions are put here (conservative)"),
    LicenseRule(LicenseClass.NONCOMMERCIAL,
                _versions("CC-BY-NC", _CC) + _versions("CC-BY-NC-SA", _CC) + _versions("CC-BY-NC-ND", _CC)
                + _versions("CC-BY-ND", _CC) + ("LicenseRef-noncommercial",),
                "SPDX; SILO excludes these from the OLC",
                "no-derivatives (ND) licences are put here too: like NC, they forbid uses training needs"),
)

# SPDX exceptions (spdx.org/licenses/exceptions-index.html) that may follow WITH; each only adds permissions.
KNOWN_EXCEPTIONS = frozenset(e.lower() for e in (
    "Classpath-exception-2.0", "GCC-exception-2.0", "GCC-exception-3.1", "LLVM-exception", "Autoconf-exception-2.0",
    "Autoconf-exception-3.0", "Autoconf-exception-generic", "Bison-exception-2.2", "Font-exception-2.0",
    "Libtool-exception", "Linux-syscall-note", "Qt-GPL-exception-1.0", "Qt-LGPL-exception-1.1",
    "u-boot-exception-2.0", "WxWindows-exception-3.1", "eCos-exception-2.0", "FLTK-exception",
    "freertos-exception-2.0", "GPL-CC-1.0", "mif-exception", "Swift-exception", "Universal-FOSS-exception-1.0",
    "openvpn-openssl-exception", "vsftpd-openssl-exception", "x11vnc-openssl-exception", "OCaml-LGPL-linking-exception",
    "GPL-3.0-linking-exception", "GPL-3.0-linking-source-exception", "LGPL-3.0-linking-exception",
    "Asterisk-exception", "GNAT-exception", "GStreamer-exception-2008", "389-exception",
    "Autoconf-exception-generic-3.0", "Autoconf-exception-macro", "Bison-exception-1.24",
    "cryptsetup-OpenSSL-exception", "GCC-exception-2.0-note", "Texinfo-exception", "PCRE2-exception",
))

# DEP-5 writes an exception as ``with <keyword> exception`` and keeps no list of keywords: these are the
# keywords of the Debian copyright files we have met, each the SPDX exception whose text it names. Any
# other keyword is an unknown exception (policy: ``unknown``), whatever its name ends with.
DEBIAN_EXCEPTIONS: dict[str, str] = {
    "autoconf": "Autoconf-exception-generic", "autoconf-data": "Autoconf-exception-macro",
    "automake": "Autoconf-exception-generic",  # the generic text, naming Automake (findutils)
    "distribution": "Autoconf-exception-generic",  # the generic text under another keyword (libunistring)
    "bison": "Bison-exception-2.2", "bison-2.2": "Bison-exception-2.2", "classpath": "Classpath-exception-2.0",
    "font": "Font-exception-2.0", "gcc-runtime-3.1": "GCC-exception-3.1", "libtool": "Libtool-exception",
    "linux-syscall-note": "Linux-syscall-note", "llvm": "LLVM-exception", "texinfo": "Texinfo-exception",
    "openssl": "cryptsetup-OpenSSL-exception",  # permission to link with OpenSSL (one of SPDX's several)
    "binary-library-like-packages": "PCRE2-exception",
}

CLASS_OF: dict[str, LicenseClass] = {i: rule.license_class for rule in RULES for i in rule.ids}
_CANONICAL = {i.lower(): i for i in CLASS_OF}

# Debian DEP-5 short names, PyPI classifier tails and common free-text names -> SPDX expression.
# Keys are compared after _key() normalisation (case, "licence", punctuation and spaces).
DEBIAN_ALIASES: dict[str, str] = {  # DEP-5 short names that are not SPDX identifiers (source: DEP-5)
    "public-domain": "LicenseRef-public-domain", "Expat": "MIT", "Artistic": "Artistic-1.0",
    "Perl": "GPL-1.0-or-later OR Artistic-1.0-Perl", "Zope": "ZPL-2.1", "Zope-2.0": "ZPL-2.0", "Zope-2.1": "ZPL-2.1",
    "Python": "Python-2.0", "Apache": "Apache-2.0", "BSD": "LicenseRef-BSD", "MPL": "MPL-1.1", "CDDL": "CDDL-1.0",
    "CPL": "CPL-1.0", "EFL": "EFL-2.0", "LPPL": "LPPL-1.3c", "QPL": "QPL-1.0", "CC0": "CC0-1.0",
    "GPL": "GPL-1.0-or-later", "LGPL": "LGPL-2.0-or-later", "AGPL": "AGPL-3.0-or-later", "GFDL": "GFDL-1.1-or-later",
    "GFDL-NIV": "GFDL-1.1-no-invariants-or-later",
}
ALIASES: dict[str, str] = {
    **DEBIAN_ALIASES,
    # PyPI trove classifier tails (source: PyPI), "License :: OSI Approved :: <tail>"
    "MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT-0", "Apache Software License": "Apache-2.0",
    "BSD License": "LicenseRef-BSD", "ISC License (ISCL)": "ISC", "Python Software Foundation License": "PSF-2.0",
    "Zope Public License": "ZPL-2.1", "zlib/libpng License": "Zlib", "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "The Unlicense (Unlicense)": "Unlicense", "Public Domain": "LicenseRef-public-domain",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0", "Universal Permissive License (UPL)": "UPL-1.0",
    "Academic Free License (AFL)": "AFL-3.0", "Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "GNU General Public License (GPL)": "GPL-1.0-or-later", "GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
    "GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0-only",
    "GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU Lesser General Public License v3 or later (LGPLv3+)": "LGPL-3.0-or-later",
    "GNU Library or Lesser General Public License (LGPL)": "LGPL-2.0-or-later",
    "GNU Affero General Public License v3": "AGPL-3.0-only",
    "GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later",
    "GNU Free Documentation License (FDL)": "GFDL-1.1-or-later",
    "Mozilla Public License 1.0 (MPL)": "MPL-1.0", "Mozilla Public License 1.1 (MPL 1.1)": "MPL-1.1",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0", "Eclipse Public License 1.0 (EPL-1.0)": "EPL-1.0",
    "Eclipse Public License 2.0 (EPL-2.0)": "EPL-2.0", "European Union Public Licence 1.2 (EUPL 1.2)": "EUPL-1.2",
    "Artistic License": "Artistic-2.0", "Common Development and Distribution License 1.0 (CDDL-1.0)": "CDDL-1.0",
    "SIL Open Font License 1.1 (OFL-1.1)": "OFL-1.1", "Sleepycat License": "Sleepycat",
    # free-text names seen in METADATA `License:` fields and README badges
    "The MIT License (MIT)": "MIT", "MIT/X11": "MIT", "MIT/Expat": "MIT", "Apache 2.0": "Apache-2.0",
    "Apache 2": "Apache-2.0", "Apache License 2.0": "Apache-2.0", "Apache License, Version 2.0": "Apache-2.0",
    "Apache Software License 2.0": "Apache-2.0", "ASL 2.0": "Apache-2.0", "new BSD": "BSD-3-Clause",
    "modified BSD": "BSD-3-Clause", "revised BSD": "BSD-3-Clause", "BSD 3-Clause": "BSD-3-Clause",
    "3-clause BSD": "BSD-3-Clause", "BSD-3": "BSD-3-Clause", "simplified BSD": "BSD-2-Clause",
    "FreeBSD": "BSD-2-Clause", "BSD 2-Clause": "BSD-2-Clause", "2-clause BSD": "BSD-2-Clause",
    "BSD-2": "BSD-2-Clause", "PSF": "PSF-2.0", "PSFL": "PSF-2.0", "PSF License": "PSF-2.0",
    "Boost": "BSL-1.0", "zlib/libpng": "Zlib", "ISCL": "ISC", "MPL 2.0": "MPL-2.0", "MPLv2": "MPL-2.0",
    "Mozilla Public License 2.0": "MPL-2.0",
    "Creative Commons Attribution 4.0": "CC-BY-4.0", "CC BY 4.0": "CC-BY-4.0", "CC BY-SA 4.0": "CC-BY-SA-4.0",
    "CC BY-NC 4.0": "CC-BY-NC-4.0", "Public-Domain": "LicenseRef-public-domain", "PD": "LicenseRef-public-domain",
    # ScanCode LicenseDB keys that SPDX headers use as LicenseRef-scancode-<key>
    "LicenseRef-scancode-public-domain": "LicenseRef-public-domain",
}

# the licence texts and references that from_license_text() recognises in a LICENSE or copyright file
_TEXT_MARKERS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.I | re.S), spdx) for p, spdx in (
    (r"permission is hereby granted, free of charge, to any person obtaining a copy", "MIT"),
    (r"permission to use, copy, modify, and(/or)? distribute this software for any purpose with or without fee",
     "ISC"),
    (r"apache license,?\s+version 2\.0|licensed under the apache license", "Apache-2.0"),
    (r"boost software license", "BSL-1.0"),
    (r"fsf all permissive license|this file is free software; the free software foundation gives unlimited permission",
     "FSFAP"),
    (r"the authors hereby grant permission to use, copy, modify, distribute, and license this software", "TCL"),
    (r"python software foundation license|psf license agreement", "PSF-2.0"),
    (r"altered source versions must be plainly marked as such", "Zlib"),
    (r"free and unencumbered software released into the public domain", "Unlicense"),
    (r"\b(is|are|been|placed|released|dedicated)\s+(in|into|to)\s+the\s+public\s+domain", "LicenseRef-public-domain"),
    (r"a public domain text", "LicenseRef-public-domain"),
    (r"\bcc0\b", "CC0-1.0"),
    (r"eclipse public license", "EPL-2.0"),
    (r"artistic license", "Artistic-1.0"),
    (r"creative commons", "LicenseRef-creative-commons"),
    (r"(for|to)\s+non-?commercial\s+(use|purposes)\s+only|not\s+for\s+commercial\s+(use|purposes)|"
     r"may\s+not\s+be\s+used\s+for\s+commercial|\bno\s+commercial\s+use", "LicenseRef-noncommercial"),
    (r"affero general public license", "AGPL-3.0-or-later"),
    (r"free documentation license", "GFDL-1.1-or-later"),
    (r"\bgnu gpl\b|\bgplv?\d?\b", "GPL-1.0-or-later"),
    (r"\blgplv?\d?\b", "LGPL-2.0-or-later"),
))
_BSD_TEXT = re.compile(r"redistribution and use in source and binary forms", re.I)
_GNU_TEXT = re.compile(r"gnu (?P<fam>lesser |library )?general public licen[cs]e"
                       r"(?P<tail>[^.]{0,120}?version (?P<ver>\d(?:\.\d)?)(?P<later>[^.]{0,60}?later version)?)?",
                       re.I | re.S)
_COMMON_LICENSES = re.compile(r"/usr/share/common-licenses/([A-Za-z0-9.+_-]+?)[.,'\"`)\s]*(?:\s|$)")
_MPL_TEXT = re.compile(r"mozilla public licen[cs]e,?\s*(?:v(?:ersion)?\.?\s*)?(?P<ver>\d\.\d)?", re.I)
_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:\s*([^\n]*)")
# the restriction words may be written with a hyphen, a space or nothing inside ("Share Alike", "Non Commercial")
_CC_TEXT = re.compile(r"creative commons (attribution[- ](?:non[- ]?commercial|share[- ]?alike|"
                      r"no[- ]?deriv(?:s|atives)|[- ])*)[^\n]{0,40}?(\d\.\d)", re.I)
# a Creative Commons licence other than CC0 named beside it ("Creative Commons BY-NC", "... Attribution")
_CC_NOT_CC0 = re.compile(r"creative commons\W+(?:\w+\W+){0,2}?(?:attribution|by|nc|sa|nd|non-?commercial|share\w*|"
                         r"no-?deriv\w*)\b", re.I)


def _key(name: str) -> str:
    """Normalise a licence name for lookup: case, British spelling, punctuation and spaces."""
    s = name.strip().lower().replace("licence", "license")
    s = re.sub(r"[\s_,;:/()\[\]\"']+", "-", s)
    return s.strip("-")


_ALIAS_KEYS = {_key(k): v for k, v in ALIASES.items()}
_GNU_FAMILIES = {"gpl": ("GPL", ("1.0", "2.0", "3.0")), "lgpl": ("LGPL", ("2.0", "2.1", "3.0")),
                 "agpl": ("AGPL", ("1.0", "3.0")), "gfdl": ("GFDL", ("1.1", "1.2", "1.3")),
                 "gfdl-niv": ("GFDL", ("1.1", "1.2", "1.3"))}
_GNU_NAME = re.compile(r"^(?:gnu-)?(?P<fam>agpl|lgpl|gpl|gfdl-niv|gfdl)-?v?(?P<ver>\d+(?:\.\d+)?)?"
                       r"(?P<later>\+|-or-later|-or-newer)?(?:-only)?$")


def _version(ver: str) -> str:
    return ver if "." in ver else f"{ver}.0"


def _normalise_symbol(name: str) -> str | None:
    """An SPDX identifier or expression for one licence name, or None when it is not recognised."""
    if name in CLASS_OF:
        return name
    key = _key(name)
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key in _ALIAS_KEYS:
        return _ALIAS_KEYS[key]
    for prefix in ("the-", ""):  # "The MIT License", "MIT License", "MIT licensed"
        for suffix in ("-license", "-licensed", ""):
            k = key.removeprefix(prefix)
            if suffix and k.endswith(suffix):
                k = k[: -len(suffix)]
            if k in _CANONICAL:
                return _CANONICAL[k]
            if k in _ALIAS_KEYS:
                return _ALIAS_KEYS[k]
    m = _GNU_NAME.match(key)  # Debian GPL-2+, SPDX-deprecated GPL-2.0+, free-text GPLv3
    if m:
        stem, versions = _GNU_FAMILIES[m["fam"]]
        ver = _version(m["ver"]) if m["ver"] else versions[0]
        later = bool(m["later"]) or not m["ver"]  # an unversioned GPL means "any version"
        if ver in versions:
            niv = "-no-invariants" if m["fam"] == "gfdl-niv" else ""
            return f"{stem}-{ver}{niv}{'-or-later' if later else '-only'}"
        return None
    if key.endswith("+"):  # SPDX "+" (or later) on a non-GNU id: same class as the id itself
        base = _normalise_symbol(name.strip()[:-1])
        return f"{base}+" if base and base in CLASS_OF else None
    m = re.match(r"^(.*)-(\d+)$", key)  # Debian "MPL-2" / "Apache-2" for MPL-2.0 / Apache-2.0
    if m and f"{m[1]}-{m[2]}.0" in _CANONICAL:
        return _CANONICAL[f"{m[1]}-{m[2]}.0"]
    return None


def _license_ref(name: str) -> str:
    ref = re.sub(r"[^A-Za-z0-9.]+", "-", name.strip().removeprefix("LicenseRef-")).strip("-.")[:64]
    return f"LicenseRef-{ref}" if ref else NOASSERTION


def class_of_id(spdx_id: str) -> LicenseClass:
    """The class of one SPDX identifier (a trailing ``+`` keeps the class); unknown when not in the table."""
    return CLASS_OF.get(spdx_id.removesuffix("+"), LicenseClass.UNKNOWN)


def _most_permissive(items: Iterable[License]) -> LicenseClass:
    return min((i.license_class for i in items), key=lambda c: c.rank)


def _most_restrictive(items: Iterable[License]) -> LicenseClass:
    return max((i.license_class for i in items), key=lambda c: c.rank)


def combine(licenses: Iterable[License], operator: str) -> License:
    """``A OR B ...`` (most permissive class) or ``A AND B ...`` (most restrictive), de-duplicated."""
    items = list(dict.fromkeys(licenses))
    if not items:
        return UNKNOWN
    if len(items) == 1:
        return items[0]
    op = operator.upper()
    if op not in ("AND", "OR"):
        raise ValueError(f"operator must be AND or OR, not {operator!r}")
    expression = f" {op} ".join(_group(i.expression) for i in items)
    cls = _most_permissive(items) if op == "OR" else _most_restrictive(items)
    return License(expression, cls)


def _group(expression: str) -> str:
    return f"({expression})" if " " in expression else expression


def _debian_commas(text: str) -> str | None:
    """DEP-5: ``A or B, and C`` means ``(A or B) and C``; None when the commas are not that syntax."""
    parts = [p.strip() for p in text.split(",")]
    out = [f"({parts[0]})"]
    for part in parts[1:]:
        m = re.match(r"^(and|or)\s+(.+)$", part, re.I)
        if not m:
            return None
        out.append(f"{m[1].upper()} ({m[2]})")
    return " ".join(out)


_TOKENS = re.compile(r"\(|\)|[^\s()]+")
_OPERATORS = {"and": "AND", "or": "OR", "with": "WITH"}
MAX_NAME = 80  # a longer single line whose names are not recognised is read as licence text
MAX_DEPTH = 64  # parentheses nested deeper than this are a syntax error, not a RecursionError


class _SyntaxError(Exception):
    pass


class _ExpressionParser:
    """Recursive descent over SPDX's expression grammar (SPDX spec annex D), precedence WITH > AND > OR.

    Written here rather than taken from ``license-expression``: that package rejects licence *names*
    inside expressions (``zlib/libpng OR MIT``, ``Apache License, Version 2.0 or GPL``), which the
    free-text fields of Debian and PyPI metadata contain. A symbol is any run of words between operators
    and parentheses; operators are case-insensitive, as in DEP-5 (``or``, ``and``, ``with``).
    """

    def __init__(self, text: str):
        self.tokens = _TOKENS.findall(text)
        self.i = 0
        self.longest = 0  # characters in the longest symbol: prose, not an expression, when large

    def parse(self) -> License:
        result = self._or(0)
        if self.i != len(self.tokens):
            raise _SyntaxError(self.tokens[self.i])
        return result

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _operator(self) -> str | None:
        tok = self._peek()
        return _OPERATORS.get(tok.lower()) if tok else None

    def _or(self, depth: int) -> License:
        items = [self._and(depth)]
        while self._operator() == "OR":
            self.i += 1
            items.append(self._and(depth))
        return combine(items, "OR")

    def _and(self, depth: int) -> License:
        items = [self._with(depth)]
        while self._operator() == "AND":
            self.i += 1
            items.append(self._with(depth))
        return combine(items, "AND")

    def _with(self, depth: int) -> License:
        base = self._atom(depth)
        if self._operator() != "WITH":
            return base
        self.i += 1
        exception = self._words()
        key = _key(exception)
        known = key in KNOWN_EXCEPTIONS or key.removesuffix("-exception") in DEBIAN_EXCEPTIONS
        name = exception if re.fullmatch(r"[A-Za-z0-9.-]+", exception) else _license_ref(exception)
        return License(f"{_group(base.expression)} WITH {name}", base.license_class if known else LicenseClass.UNKNOWN)

    def _atom(self, depth: int) -> License:
        if self._peek() == "(":
            if depth >= MAX_DEPTH:
                raise _SyntaxError("nesting")
            self.i += 1
            inner = self._or(depth + 1)
            if self._peek() != ")":
                raise _SyntaxError("unbalanced")
            self.i += 1
            return inner
        return _symbol(self._words())

    def _words(self) -> str:
        start = self.i
        while (tok := self._peek()) is not None and tok not in "()" and self._operator() is None:
            self.i += 1
        if self.i == start:
            raise _SyntaxError(self._peek() or "end")
        words = " ".join(self.tokens[start:self.i])
        self.longest = max(self.longest, len(words))
        return words


def _symbol(name: str) -> License:
    spdx = _normalise_symbol(name)
    if spdx is None:
        return License(_license_ref(name), LicenseClass.UNKNOWN)
    if spdx.removesuffix("+") in CLASS_OF:
        return License(spdx, class_of_id(spdx))
    return _parse(spdx) or UNKNOWN  # an alias that is itself an expression (Debian "Perl")


def _parse(text: str) -> License | None:
    """The classified expression, or None when ``text`` is not a well-formed expression."""
    try:
        return _ExpressionParser(text).parse()
    except _SyntaxError:
        return None


@functools.lru_cache(maxsize=65536)
def classify(text: str | None) -> License:
    """Classify a licence field: an SPDX expression, a Debian ``License:`` synopsis, or a licence name.

    Never raises; whatever it does not recognise is ``unknown``. A multi-line text or a long line that is
    not a recognised expression (a whole licence) goes to :func:`from_license_text`.
    """
    if not text or not text.strip():
        return UNKNOWN
    text = text.strip()
    if "\n" not in text:
        if _normalise_symbol(text) is not None:
            return _symbol(text)
        parser = _ExpressionParser((_debian_commas(text) if "," in text else None) or text)
        try:
            parsed = parser.parse()
        except _SyntaxError:
            parsed = None
        if parsed is not None and (parser.longest <= MAX_NAME or parsed.license_class != LicenseClass.UNKNOWN):
            return parsed  # an expression of licence names (not a sentence that happens to contain "and")
        if len(text) <= MAX_NAME:
            return License(_license_ref(text), LicenseClass.UNKNOWN)
    else:
        first = text.splitlines()[0].strip()
        if first and len(first) <= MAX_NAME and (lic := classify(first)).license_class != LicenseClass.UNKNOWN:
            return lic  # "MIT License\n\nCopyright (c) ..." (a METADATA License field holding the whole file)
    return from_license_text(text)


def from_classifiers(classifiers: Iterable[str]) -> License | None:
    """The licence stated by PyPI ``License ::`` classifiers (several are combined with AND), or None."""
    found = []
    for c in classifiers:
        parts = [p.strip() for p in c.split("::")]
        if len(parts) < 2 or parts[0] != "License":
            continue
        tail = parts[-1]
        if tail in ("OSI Approved", "Freely Distributable", "DFSG approved"):
            found.append(UNKNOWN)  # says "some licence", not which one
        elif tail == "Other/Proprietary License":
            found.append(License("LicenseRef-proprietary", LicenseClass.UNKNOWN))
        else:
            found.append(classify(tail))
    known = [f for f in found if f is not UNKNOWN] or found
    return combine(known, "AND") if known else None


def spdx_header(text: str, *, max_lines: int = 30) -> License | None:
    """The licence of a file from an ``SPDX-License-Identifier:`` line in its first lines, or None."""
    head = "\n".join(text.splitlines()[:max_lines])
    m = _SPDX_HEADER.search(head)
    if not m:
        return None
    value = re.split(r"\*/|-->|\"\"\"|'''", m[1])[0].strip().rstrip(";").strip()
    return classify(value) if value else None


def from_license_text(text: str) -> License:
    """Classify a whole licence text or a free-form (non-DEP-5) copyright file by the licences it names.

    Recognised: the canonical wording of MIT, BSD (2/3/4-clause by its clauses), ISC, Apache-2.0, Zlib,
    Boost, PSF, the Unlicense, public-domain dedications, GNU licences with their versions, MPL, EPL,
    Artistic, Creative Commons variants, and Debian's ``/usr/share/common-licenses/NAME`` references.
    One licence, or several of the same class, give that class (AND of them); licences of different
    classes give ``unknown`` (:data:`AMBIGUOUS`): the file does not say which applies to what.
    """
    text = _flatten(text)
    found: dict[str, License] = {}

    def add(lic: License) -> None:
        found.setdefault(lic.expression, lic)

    unversioned = set()
    for m in _GNU_TEXT.finditer(text):  # "GNU General Public License ... version 2, or ... any later version"
        fam = "LGPL" if m["fam"] else "GPL"
        versions = _GNU_FAMILIES[fam.lower()][1]
        ver = _version(m["ver"]) if m["ver"] else None
        if ver in versions:
            add(License(f"{fam}-{ver}{'-or-later' if m['later'] else '-only'}", LicenseClass.COPYLEFT))
        else:
            unversioned.add(fam)
    for fam in sorted(unversioned):  # a bare mention ("see the GNU GPL for details") when no version is given
        if not any(e.startswith(f"{fam}-") for e in found):
            add(License(f"{fam}-{_GNU_FAMILIES[fam.lower()][1][0]}-or-later", LicenseClass.COPYLEFT))
    if m := _MPL_TEXT.search(text):
        add(classify(f"MPL-{m['ver'] or '2.0'}"))
    for m in _COMMON_LICENSES.finditer(text):
        name = m[1]
        if name.upper().startswith(("GPL", "LGPL")) and re.search(r"any later version|or later", text, re.I):
            name = name if name.endswith("+") else f"{name}+"
        add(classify(name))
    if _BSD_TEXT.search(text):
        if re.search(r"advertising materials", text, re.I):
            add(License("BSD-4-Clause", LicenseClass.PERMISSIVE_SW))
        elif re.search(r"neither the name|endorse or promote", text, re.I):
            add(License("BSD-3-Clause", LicenseClass.PERMISSIVE_SW))
        else:
            add(License("BSD-2-Clause", LicenseClass.PERMISSIVE_SW))
    for m in _CC_TEXT.finditer(text):
        words = _key(m[1])
        stem = "CC-BY" + ("-NC" if "commercial" in words else "") + ("-SA" if "share" in words else "") + (
            "-ND" if "deriv" in words else "")
        add(classify(f"{stem}-{m[2]}"))
    for pattern, spdx in _TEXT_MARKERS:
        if spdx == "LicenseRef-creative-commons" and _CC_TEXT.search(text):
            continue
        if spdx == "LicenseRef-creative-commons" and "CC0-1.0" in found and not _CC_NOT_CC0.search(text):
            continue  # CC0's own legal text names Creative Commons ("Creative Commons Corporation ...")
        family = spdx.split("-")[0] + "-"
        if family in ("GPL-", "LGPL-") and any(e.startswith(family) for e in found):
            continue  # a bare "GPL" when the text also names the version
        if spdx == "LicenseRef-public-domain" and "Unlicense" in found:
            continue
        if pattern.search(text):
            add(License(spdx, class_of_id(spdx)) if spdx in CLASS_OF else License(spdx, LicenseClass.UNKNOWN))
    licenses = sorted(found.values(), key=lambda lic: lic.expression)
    if not licenses:
        return UNKNOWN
    if len({lic.license_class for lic in licenses}) > 1:
        return License(AMBIGUOUS, LicenseClass.UNKNOWN)
    return combine(licenses, "AND")


def _flatten(text: str) -> str:
    """Drop comment leaders (``*``, ``#``, ``//``) and DEP-5 ``.`` lines and join lines: phrases match across them."""
    text = re.sub(r"(?m)^[ \t]*(?:\*|#+|//|;+|\.$)[ \t]?", " ", text)
    return re.sub(r"\s+", " ", text)


def policy_markdown() -> str:
    """README's licence-policy section: the policy in a few lines and the table of licence -> class."""
    lines = ["### Licence policy", ""]
    lines += [f"- {p}" for p in POLICY]
    lines += ["", "| class | licences (SPDX identifiers) | source | note |", "|---|---|---|---|"]
    for rule in RULES:
        ids = ", ".join(f"`{i}`" for i in rule.ids)
        lines.append(f"| `{rule.license_class}` | {ids} | {rule.source} | {rule.note} |")
    lines.append("| `unknown` | anything else, `NOASSERTION`, `LicenseRef-ambiguous`, an unknown `WITH` exception "
                 "| policy | never treated as permissive |")
    debian = ", ".join(f"`{k}` = `{v}`" for k, v in DEBIAN_ALIASES.items())
    lines += ["", f"Debian short names read as SPDX: {debian}; a version suffix `-N` is `-N.0` and `+` is "
              "`-or-later` (`GPL-2+` = `GPL-2.0-or-later`, `LGPL-2.1` = `LGPL-2.1-only`)."]
    lines += ["", "Sources: " + "; ".join(f"{k}: {v}" for k, v in SOURCES.items()) + ".", ""]
    return "\n".join(lines)
