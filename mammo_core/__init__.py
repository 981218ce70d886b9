"""mammo_core: the paper's mammography CNN and its successors, grouped by stage: `io` (images in), `data`
(datasets, splits), `models`, `training`, `evaluation`, `inference` (scoring, Grad-CAM), `store` (cards,
model folders, audit), with `cli`, `pacs` and `auth` as front ends.

Importing this package is cheap: TensorFlow is imported only by the modules that need it (models,
training, inference), so the Streamlit app can paint before it loads.
"""

__version__ = "0.1.0"
