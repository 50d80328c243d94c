"""Data: raw DICOM and reports in, de-identified shard rows and training tensors out.

``sources`` lists records, ``dicom`` decodes pixels, ``deid`` de-identifies, ``reports`` splits
report sections, ``labels`` holds the CheXpert labels and their policies, ``records`` turns one
record into shard rows, ``batching`` turns shard rows into tensors, ``synth`` writes a synthetic
corpus in MIMIC-CXR layout.
"""
