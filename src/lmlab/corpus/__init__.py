"""Licensed corpora: documents with provenance and SPDX licences, harvested from real sources.

What other families use (see DESIGN.md, "Contracts between families")::

    from lmlab.corpus import open_corpus
    corpus = open_corpus("corpus/")              # a built corpus, or a plain folder of .txt/.md/.jsonl
    for doc in corpus.permissive():              # SILO's training pool: public domain + permissive (+ CC-BY)
        doc.id, doc.text, doc.source, doc.license, doc.license_class, doc.meta

- :mod:`~lmlab.corpus.document`: ``Document(id, text, source, license, license_class, meta)``
- :mod:`~lmlab.corpus.licenses`: SPDX / Debian / PyPI licence parsing into SILO's licence classes
- :mod:`~lmlab.corpus.store`: the Parquet-sharded store (atomic appends, resume, de-duplication)
- :mod:`~lmlab.corpus.harvest`: Debian packages, .deb files, wheels, plain folders, JSONL, Shakespeare
- :mod:`~lmlab.corpus.build`, :mod:`~lmlab.corpus.split`: ``lmlab corpus build`` / ``split``
"""

from lmlab.corpus.build import BuildConfig, build_corpus, harvester_for
from lmlab.corpus.document import Document, document_id, normalise_text, text_hash
from lmlab.corpus.licenses import (
    PERMISSIVE_CLASSES,
    License,
    LicenseClass,
    classify,
    from_classifiers,
    from_license_text,
    policy_markdown,
    spdx_header,
)
from lmlab.corpus.split import SplitConfig, SplitReport, split_corpus
from lmlab.corpus.store import BaseCorpus, Corpus, CorpusWriter, StoreConfig, TextCorpus, open_corpus

__all__ = [
    "PERMISSIVE_CLASSES", "BaseCorpus", "BuildConfig", "Corpus", "CorpusWriter", "Document", "License",
    "LicenseClass", "SplitConfig", "SplitReport", "StoreConfig", "TextCorpus", "build_corpus", "classify",
    "document_id", "from_classifiers", "from_license_text", "harvester_for", "normalise_text", "open_corpus",
    "policy_markdown", "spdx_header", "split_corpus", "text_hash",
]
