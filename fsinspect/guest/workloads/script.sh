# script: the test's own steps, from the share (fsi_script=PATH under the mount, default .fsi-script.sh),
# sourced so that mark/step/param/expect are at hand.  A test writes the scenario it needs next to its data
# instead of adding a workload (and an initramfs rebuild) per scenario.  The script is copied to RAM
# first: the shell reads a sourced file as it goes, and a scenario may cut the share off.
wl_script() {
    _s="$MNT/$(param script .fsi-script.sh)"
    if ! cp "$_s" /tmp/fsi-script.sh 2>/dev/null; then
        mark error "no script $_s on the share"
        FAILED="$FAILED script"
        return
    fi
    . /tmp/fsi-script.sh
}
