"""thinc and spaCy: the registered architectures, the thinc layer over an
adapter, word features, precomputed vectors and the components (factories).
Imports ``model`` only."""
