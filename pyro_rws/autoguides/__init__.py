# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Amortized autoguides: guides q(z | x) built from the model, conditioned on its observations."""

from .embedding import ObservationEmbedding, Standardize, datapoints, default_embedding_net
from .flow import AutoAmortizedFlow
from .proposal import AutoAmortizedProposal

__all__ = [
    "AutoAmortizedFlow",
    "AutoAmortizedProposal",
    "ObservationEmbedding",
    "Standardize",
    "datapoints",
    "default_embedding_net",
]
