"""optimum-quanto: qtensor weights in the diffusers/quanto checkpoint layout."""
