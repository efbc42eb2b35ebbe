"""The three tasks (segmentation, salient object detection, detection): per task, its datasets,
model, loss, evaluation and report, plugged into the shared engine and trainer."""
