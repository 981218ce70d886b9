"""Images in: decoding files and DICOM into 8-bit grayscale with bounded memory (`images`, `dicom`, `pixels`),
and the one preprocessing that turns any decoded mammogram into the model's input (`preprocessing`).
NumPy, Pillow, pydicom, SciPy and scikit-image only: no TensorFlow."""
