"""Predict latency, energy and memory of any model config, format and catalogued hardware.

    >>> from joules.predict import ModelShape, Workload, predict
    >>> shape, manifest = ModelShape.load("smollm2-135m")          # config only, no weights
    >>> p = predict(shape, "h100", Workload(prompt_len=512, gen_len=128), weight_format="int4-g128")
    >>> p.method
    'predicted'

An analytic speed-of-light model (per-operator roofline plus overheads, dequantisation and an
energy model), calibrated on this machine by ``joules predict calibrate``. See
``roofline.py`` for the operator table and ``calibrate.py`` for the fit.
"""

from joules.predict.calibrate import Calibration, Observation, fit, load_calibration
from joules.predict.catalog import HardwareSpec, get_hardware, hardware_names, load_catalog
from joules.predict.predictor import predict
from joules.predict.result import Prediction
from joules.predict.roofline import Coefficients, Workload
from joules.predict.shape import ModelShape

__all__ = [
    "Calibration",
    "Coefficients",
    "HardwareSpec",
    "ModelShape",
    "Observation",
    "Prediction",
    "Workload",
    "fit",
    "get_hardware",
    "hardware_names",
    "load_calibration",
    "load_catalog",
    "predict",
]
