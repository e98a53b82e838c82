"""fedgin: federated multi-modal (CT + MRI) abdominal organ segmentation with GIN augmentation."""

__version__ = "0.1.0"
