"""Metric kernels: generative-model metrics, retrieval (mAP, enrichment), clustering and mixing.

All are jitted JAX kernels that accept NumPy or (possibly sample-sharded) JAX arrays and return
Python floats, NumPy arrays or pandas DataFrames.
"""

from morphjax.metrics.stats import (Moments, init_moments, mean_cov, merge_moments, moments,
                                    update_moments)
from morphjax.metrics.generative import (fid, frechet_distance, inception_score, kid, mmd_rbf,
                                         prdc)
from morphjax.metrics.retrieval import (average_precision, folds_of_enrichment,
                                        interpolated_map, mean_average_precision, precision_at_k)
from morphjax.metrics.clustering import (ari, batch_entropy, gini, ilisi, kmeans, knn_accuracy,
                                         nmi, purity, silhouette, silhouette_batch, tanimoto)
