"""moeflux: a streaming-experts Mixture-of-Experts inference engine."""
__version__ = "0.1.0"
