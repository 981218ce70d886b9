"""Training: the one fit (`fit`), model directories (`train`), cross-validation (`cv`, `cv_trainers`),
frozen-feature heads (`feature_cache`, `heads`), cached-trunk fine-tuning and its ensemble (`finetune`,
`ensemble`), calibration of a trained model (`calibrate`) and tf.distribute (`distribute`)."""
