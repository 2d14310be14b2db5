"""The licence parser: the policy's invariants as properties (hypothesis), plus real-world spellings."""

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.corpus.licenses import (
    ALIASES,
    AMBIGUOUS,
    CLASS_OF,
    NOASSERTION,
    PERMISSIVE_CLASSES,
    License,
    LicenseClass,
    classify,
    combine,
    from_classifiers,
    from_license_text,
    policy_markdown,
    spdx_header,
)

# names usable inside an expression: free-text names containing "or"/"and"/parentheses are not
# ("GNU General Public License v2 or later (GPLv2+)" is only recognised on its own)
COMPOSABLE = [n for n in sorted(CLASS_OF) + sorted(ALIASES) if not re.search(r"[()]|\b(or|and|with)\b", n, re.I)]
KNOWN = COMPOSABLE + ["GPL-2+", "LGPL-2.1+", "GPL-3.0+", "GPLv3", "BSD-3-clause", "Apache-2"]
known_names = st.sampled_from(KNOWN)
# "Zq" + [a-z0-9-]: can never be a licence name in the tables or a phrase the text matcher knows
unknown_names = st.from_regex(r"Zq[a-z0-9]{1,8}(-[0-9]\.[0-9])?", fullmatch=True)


def expressions(leaves):
    return st.recursive(leaves, lambda inner: st.tuples(inner, st.sampled_from(["AND", "OR"]), inner).map(
        lambda t: f"({t[0]}) {t[1]} ({t[2]})"), max_leaves=4)


any_expr = expressions(st.one_of(known_names, unknown_names))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rank(text: str) -> int:
    return classify(text).license_class.rank


@FAST
@given(any_expr)
def test_or_with_itself_is_itself(x):
    assert classify(f"({x}) OR ({x})").license_class == classify(x).license_class
    assert classify(f"({x}) AND ({x})").license_class == classify(x).license_class


@FAST
@given(any_expr, any_expr)
def test_or_is_never_more_restrictive_and_and_never_more_permissive(a, b):
    assert rank(f"({a}) OR ({b})") == min(rank(a), rank(b))
    assert rank(f"({a}) AND ({b})") == max(rank(a), rank(b))


@FAST
@given(any_expr, any_expr)
def test_operators_commute(a, b):
    assert classify(f"({a}) OR ({b})").license_class == classify(f"({b}) OR ({a})").license_class
    assert classify(f"({a}) AND ({b})").license_class == classify(f"({b}) AND ({a})").license_class


@FAST
@given(expressions(unknown_names))
def test_unknown_names_never_yield_a_permissive_class(x):
    assert classify(x).license_class == LicenseClass.UNKNOWN


@FAST
@given(any_expr, unknown_names)
def test_and_with_an_unknown_licence_is_unknown(x, u):
    assert classify(f"({x}) AND {u}").license_class == LicenseClass.UNKNOWN
    assert classify(f"({x}) WITH {u}").license_class == LicenseClass.UNKNOWN


@FAST
@given(any_expr)
def test_the_output_expression_reclassifies_to_the_same_class(x):
    lic = classify(x)
    assert classify(lic.expression).license_class == lic.license_class


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text):
    for lic in (classify(text), from_license_text(text), spdx_header(text) or classify(None)):
        assert isinstance(lic, License) and isinstance(lic.expression, str)
        assert lic.license_class in set(LicenseClass)
    assert from_classifiers(text.splitlines()) is None or isinstance(from_classifiers(text.splitlines()), License)


@pytest.mark.parametrize(("text", "expression", "cls"), [
    ("MIT", "MIT", "permissive_sw"),
    ("Expat", "MIT", "permissive_sw"),
    ("BSD-3-clause", "BSD-3-Clause", "permissive_sw"),
    ("public-domain", "LicenseRef-public-domain", "public_domain"),
    ("CC0-1.0", "CC0-1.0", "public_domain"),
    ("Unlicense", "Unlicense", "public_domain"),
    ("GPL-2+", "GPL-2.0-or-later", "copyleft"),
    ("GPL-2.0+", "GPL-2.0-or-later", "copyleft"),
    ("LGPL-2.1", "LGPL-2.1-only", "copyleft"),
    ("GFDL-NIV-1.2+", "GFDL-1.2-no-invariants-or-later", "copyleft"),
    ("CC-BY-4.0", "CC-BY-4.0", "attribution"),
    ("CC-BY-SA-3.0", "CC-BY-SA-3.0", "copyleft"),
    ("CC-BY-NC-SA-4.0", "CC-BY-NC-SA-4.0", "noncommercial"),
    ("CC-BY-ND-4.0", "CC-BY-ND-4.0", "noncommercial"),
    ("Apache License, Version 2.0", "Apache-2.0", "permissive_sw"),
    ("The MIT License (MIT)", "MIT", "permissive_sw"),
    ("GPLv3+", "GPL-3.0-or-later", "copyleft"),
    ("MIT OR Apache-2.0", "MIT OR Apache-2.0", "permissive_sw"),
    ("GPL-2+ or Artistic-2.0, and BSD-3-clause", "(GPL-2.0-or-later OR Artistic-2.0) AND BSD-3-Clause", "copyleft"),
    ("BSD-3-clause or GPL-2+", "BSD-3-Clause OR GPL-2.0-or-later", "permissive_sw"),
    ("Perl", "GPL-1.0-or-later OR Artistic-1.0-Perl", "copyleft"),
    ("GPL-2.0-or-later WITH Classpath-exception-2.0", "GPL-2.0-or-later WITH Classpath-exception-2.0", "copyleft"),
    ("MIT WITH no-commercial-use-allowed", "MIT WITH no-commercial-use-allowed", "unknown"),
    # an exception is known by its SPDX id or its DEP-5 keyword, not by ending in "-exception" (README's policy)
    ("MIT WITH Made-Up-exception", "MIT WITH Made-Up-exception", "unknown"),
    ("GPL-2+ with Made-Up exception", "GPL-2.0-or-later WITH LicenseRef-Made-Up-exception", "unknown"),
    ("GPL-2+ with Autoconf exception", "GPL-2.0-or-later WITH LicenseRef-Autoconf-exception", "copyleft"),
    ("GPL-3+ with Bison-2.2 exception", "GPL-3.0-or-later WITH LicenseRef-Bison-2.2-exception", "copyleft"),
    ("GPL-2 with Linux-syscall-note exception", "GPL-2.0-only WITH LicenseRef-Linux-syscall-note-exception",
     "copyleft"),
    ("Apache-2.0 with LLVM exception", "Apache-2.0 WITH LicenseRef-LLVM-exception", "permissive_sw"),
    ("GPL-3.0-or-later WITH Texinfo-exception", "GPL-3.0-or-later WITH Texinfo-exception", "copyleft"),
    ("MIT AND WordNet3.0", "MIT AND LicenseRef-WordNet3.0", "unknown"),
    ("Proprietary", "LicenseRef-Proprietary", "unknown"),
    ("GPL-7+", "LicenseRef-GPL-7", "unknown"),
    ("", NOASSERTION, "unknown"),
])
def test_real_world_spellings(text, expression, cls):
    lic = classify(text)
    assert (lic.expression, lic.license_class) == (expression, cls)


def test_pypi_classifiers():
    mit = ["License :: OSI Approved :: MIT License", "Programming Language :: Python"]
    assert from_classifiers(mit) == License("MIT", LicenseClass.PERMISSIVE_SW)
    dual = ["License :: OSI Approved :: MIT License",
            "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]
    assert from_classifiers(dual).license_class == "copyleft"  # several classifiers: AND (most restrictive)
    assert from_classifiers(["License :: OSI Approved"]).license_class == "unknown"
    assert from_classifiers(["License :: Other/Proprietary License"]).license_class == "unknown"
    assert from_classifiers(["Topic :: Utilities"]) is None


MIT_TEXT = """MIT License

Copyright (c) 2020 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
"""

BSD3_COMMENTED = """/*
 * Redistribution and use in source and binary forms, with or without
 * modification, are permitted provided that the following conditions are met:
 * 3. Neither the name of the copyright holder nor the names of its
 *    contributors may be used to endorse or promote products derived
 */"""


def test_licence_texts():
    assert classify(MIT_TEXT).expression == "MIT"
    assert from_license_text(MIT_TEXT.replace("MIT License", "")).expression == "MIT"
    assert from_license_text(BSD3_COMMENTED).expression == "BSD-3-Clause"
    gpl = ("This program is free software; you can redistribute it under the terms of the GNU General\n"
           "Public License as published by the Free Software Foundation; either version 2, or (at your\n"
           "option) any later version.\nOn Debian systems see /usr/share/common-licenses/GPL-2.\n")
    assert from_license_text(gpl) == License("GPL-2.0-or-later", LicenseClass.COPYLEFT)
    assert from_license_text("This text is in the public domain.").license_class == "public_domain"
    # an MIT part and a GPL part: which applies to what is not said, so unknown, never permissive
    assert from_license_text(MIT_TEXT + "\n" + gpl) == License(AMBIGUOUS, LicenseClass.UNKNOWN)
    # the Unlicense says "commercial or non-commercial": not a noncommercial licence
    unlicense = ("This is free and unencumbered software released into the public domain. Anyone is free to "
                 "copy ... for any purpose, commercial or non-commercial, and by any means.")
    assert from_license_text(unlicense) == License("Unlicense", LicenseClass.PUBLIC_DOMAIN)
    assert from_license_text("For non-commercial use only. Permission is hereby granted, free of charge, to any "
                             "person obtaining a copy").license_class == "unknown"
    assert from_license_text("Some words about nothing in particular.").license_class == "unknown"


@pytest.mark.parametrize(("text", "expression"), [
    ("Creative Commons Attribution-Share Alike 3.0 Unported License", "CC-BY-SA-3.0"),
    ("Creative Commons Attribution Share Alike 4.0 license", "CC-BY-SA-4.0"),
    ("Creative Commons Attribution-ShareAlike 4.0 International", "CC-BY-SA-4.0"),
    ("Creative Commons Attribution-Non Commercial 4.0 International", "CC-BY-NC-4.0"),
    ("Creative Commons Attribution-NonCommercial 4.0 International", "CC-BY-NC-4.0"),
    ("Creative Commons Attribution-No Derivatives 4.0 International", "CC-BY-ND-4.0"),
    ("Creative Commons Attribution-No Derivs 3.0", "CC-BY-ND-3.0"),
    ("Creative Commons Attribution Non Commercial Share Alike 3.0", "CC-BY-NC-SA-3.0"),
    ("Creative Commons Attribution 4.0 International", "CC-BY-4.0"),
])
def test_creative_commons_texts_with_spaced_restrictions(text, expression):
    # "Share Alike" with a space was read as plain CC-BY: restricted text in the permissive pool
    lic = classify(f"This work is licensed under the {text}.\nTo view a copy visit ...")
    assert lic == License(expression, CLASS_OF[expression])


CC0_TEXT = """Creative Commons Legal Code

CC0 1.0 Universal

    CREATIVE COMMONS CORPORATION IS NOT A LAW FIRM AND DOES NOT PROVIDE
    LEGAL SERVICES. CREATIVE COMMONS PROVIDES THIS INFORMATION ON AN "AS-IS" BASIS.

Statement of Purpose
...
 d. Affirmer understands and acknowledges that Creative Commons is not a
    party to this document and has no duty or obligation with respect to this CC0 or use of the Work.
"""


def test_cc0_legal_text_is_public_domain():
    # CC0's own text names "Creative Commons" (the corporation): that is not a second, unknown CC licence
    assert classify(CC0_TEXT) == License("CC0-1.0", LicenseClass.PUBLIC_DOMAIN)
    full = Path("/usr/share/common-licenses/CC0-1.0")
    if full.is_file():
        assert classify(full.read_text()) == License("CC0-1.0", LicenseClass.PUBLIC_DOMAIN)
    # another Creative Commons licence named beside CC0 still makes the text ambiguous
    assert classify(CC0_TEXT + "\nThe images are under Creative Commons BY-NC-SA.\n").license_class == "unknown"
    assert from_license_text("Code: CC0. Images: Creative Commons Attribution, no version.").license_class == "unknown"


def test_spdx_header():
    assert spdx_header("# SPDX-License-Identifier: Apache-2.0\nimport os\n").expression == "Apache-2.0"
    assert spdx_header("/* SPDX-License-Identifier: GPL-2.0-only OR MIT */\n").expression == "GPL-2.0-only OR MIT"
    assert spdx_header("<!-- SPDX-License-Identifier: CC-BY-4.0 -->").expression == "CC-BY-4.0"
    assert spdx_header("\n" * 40 + "# SPDX-License-Identifier: MIT") is None  # only the head of a file counts
    assert spdx_header("no header") is None


def test_combine_and_permissive_set():
    mit, gpl = classify("MIT"), classify("GPL-3.0-only")
    assert combine([mit, gpl], "OR").license_class == "permissive_sw"
    assert combine([mit, gpl], "AND").license_class == "copyleft"
    assert combine([mit, mit], "AND") == mit
    assert PERMISSIVE_CLASSES == {"public_domain", "permissive_sw", "attribution"}
    assert LicenseClass.UNKNOWN.rank == max(c.rank for c in LicenseClass)


def test_policy_markdown_is_deterministic_and_covers_every_licence():
    md = policy_markdown()
    assert md == policy_markdown()
    for spdx in CLASS_OF:
        assert f"`{spdx}`" in md
    for cls in LicenseClass:
        assert f"| `{cls}` |" in md
    assert "spdx.org" in md and "copyright-format/1.0" in md and "2308.04430" in md
