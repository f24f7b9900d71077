"""Scale-out on Ray: Ray Serve (``serve``) and Ray Data (``data``) over the
serving layer's pool and API module. Needs the ``ray`` extra."""
