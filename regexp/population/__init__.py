"""Population training: many small models of one sweep trained as one batched computation.

Members differ by seed, by values that enter elementwise (lr, momentum/betas, weight decay,
dropout p, label smoothing, label noise, penalty λ, clip norm) and by width (a CNN's channels);
``compat`` decides who trains with whom and buckets widths, ``stacked_mlp`` / ``stacked_cnn`` hold
the stacked parameters (MLPs; 1-D CNNs as grouped convolutions), ``optim`` and
``dropout`` apply the update and the masks per member, ``engine`` runs the loop, ``member``
writes each member's files, and ``run`` ties a sweep's points to all of that.
"""
from regexp.population.engine import Options
from regexp.population.run import train_population, use_population

__all__ = ["Options", "train_population", "use_population"]
