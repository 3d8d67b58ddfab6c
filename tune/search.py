"""`python tune/search.py ARGS` = `vlds tune ARGS`: the Ray Tune + ASHA search of a checkout.

The search lives in the package (vlds/tune/, installed with vlds: `pip install -e ".[tune]"`);
this script only calls it, so `python tune/search.py ...` keeps working as documented.
"""

from vlds.tune.search import main

if __name__ == "__main__":
    main()
