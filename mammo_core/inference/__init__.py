"""Scoring: the Predictor the CLI, the app and the PACS path share (`predict`), Grad-CAM and overlays
(`explain`), the ensemble's compiled scorer (`ensemble`), results files (`results_out`) and Ray (`ray_engine`)."""
