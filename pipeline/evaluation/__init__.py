"""From trained models to reported results: sampling, metrics, figures and the experiments' tables."""
