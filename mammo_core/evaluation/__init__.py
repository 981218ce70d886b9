"""Evaluation from predictions: metrics (`metrics`), cluster-bootstrap intervals (`bootstrap`), temperature
scaling and operating points (`calibration`), breast- and exam-level AUC (`breast_level`). No TensorFlow."""
