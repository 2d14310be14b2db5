"""The substrate every family uses: models, tokenizers, training, scoring, hooks, generation backends.

Import the submodules you need (``from lmlab.lm import models, score``); they are kept separate so
that importing one does not pull in the others' dependencies.
"""
