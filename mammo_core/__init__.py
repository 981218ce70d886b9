"""mammo_core: the paper's mammography CNN, data splits, training, evaluation and Grad-CAM.

Importing this package is cheap: TensorFlow is imported only by the modules that need it
(`model`, `train`, `explain`, `predict`), so the Streamlit app can paint before it loads.
"""

__version__ = "0.1.0"
