"""Analysis of notes, with no model in sight: musical features (`features`), the originality
index that finds copied spans (`originality`), the style classifier (`style_classifier`) and the
Kneser-Ney n-gram baseline (`ngram`).

Works on data_prep.notes arrays and event ids. May import numpy/sklearn, data_prep, mgpt.errors
and mgpt.train.data (to read a dataset split); never mgpt.model, mgpt.sample, mgpt.eval or a
command. mgpt.eval's report sections and the copy guard build on it.
"""
