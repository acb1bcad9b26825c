"""What `quantsave inspect` and `quantsave verify` compute, through the one checkpoint reader and
the backends' layouts."""
