# crud: every namespace and data operation once, each checked by reading it back.
CRUD=$MNT/.fsi-crud

crud_create() {
    rm -rf "$CRUD"
    must "mkdir workdir" mkdir "$CRUD" || return 1
    echo hello >"$CRUD/a" || return 1
    expect "content after create" "$(cat "$CRUD/a")" hello || return 1
    expect "size after create" "$(stat -c %s "$CRUD/a")" 6
}

crud_append() {
    echo world >>"$CRUD/a" || return 1
    printf 'hello\nworld\n' >/tmp/want
    must "content after append" cmp /tmp/want "$CRUD/a" || return 1
    expect "size after append" "$(stat -c %s "$CRUD/a")" 12
}

crud_rename() {
    must "mv a b" mv "$CRUD/a" "$CRUD/b" || return 1
    expect "old name gone" "$([ -e "$CRUD/a" ] && echo present || echo absent)" absent || return 1
    must "content after rename" cmp /tmp/want "$CRUD/b"
}

crud_symlink() {
    must "symlink" ln -s b "$CRUD/s" || return 1
    expect "readlink" "$(readlink "$CRUD/s")" b || return 1
    expect "lstat type" "$(stat -c %F "$CRUD/s")" "symbolic link" || return 1
    must "read through symlink" cmp /tmp/want "$CRUD/s"
}

crud_link() {
    must "hard link" ln "$CRUD/b" "$CRUD/h" || return 1
    expect "nlink" "$(stat -c %h "$CRUD/b")" 2 || return 1
    expect "same inode" "$(stat -c %i "$CRUD/h")" "$(stat -c %i "$CRUD/b")" || return 1
    must "content via link" cmp /tmp/want "$CRUD/h"
}

crud_dir() {
    must "mkdir" mkdir "$CRUD/d" || return 1
    must "mkdir nested" mkdir "$CRUD/d/e" || return 1
    expect "dir nlink" "$(stat -c %h "$CRUD/d")" 3 || return 1
    must "rmdir nested" rmdir "$CRUD/d/e" || return 1
    must "rmdir" rmdir "$CRUD/d" || return 1
    expect "dir gone" "$([ -e "$CRUD/d" ] && echo present || echo absent)" absent
}

crud_truncate() {
    must "truncate down" truncate -s 3 "$CRUD/b" || return 1
    expect "content after truncate" "$(cat "$CRUD/b")" hel || return 1
    must "truncate up" truncate -s 8192 "$CRUD/b" || return 1
    expect "size after extend" "$(stat -c %s "$CRUD/b")" 8192 || return 1
    expect "hole reads zero" "$(dd if="$CRUD/b" bs=1 skip=100 count=4 2>/dev/null | od -An -tx1 | tr -d ' ')" 00000000
}

crud_xattr() {
    must "setfattr" setfattr -n user.fsinspect -v 42 "$CRUD/b" || return 1
    expect "getfattr" "$(getfattr --only-values -n user.fsinspect "$CRUD/b")" 42 || return 1
    expect "listxattr" "$(getfattr -d -m '^user\.' "$CRUD/b" | grep -c user.fsinspect)" 1 || return 1
    must "removexattr" setfattr -x user.fsinspect "$CRUD/b" || return 1
    expect "xattr gone" "$(getfattr --only-values -n user.fsinspect "$CRUD/b" 2>/dev/null; echo rc=$?)" rc=1
}

crud_unlink() {
    must "unlink link" unlink "$CRUD/h" || return 1
    expect "nlink after unlink" "$(stat -c %h "$CRUD/b")" 1 || return 1
    must "rm symlink" rm "$CRUD/s" || return 1
    must "rm file" rm "$CRUD/b" || return 1
    must "rmdir workdir" rmdir "$CRUD" || return 1
    expect "workdir gone" "$([ -e "$CRUD" ] && echo present || echo absent)" absent
}

wl_crud() {
    step crud-create crud_create
    step crud-append crud_append
    step crud-rename crud_rename
    step crud-symlink crud_symlink
    step crud-link crud_link
    step crud-dir crud_dir
    step crud-truncate crud_truncate
    if [ "$(param xattr 0)" = 1 ]; then
        step crud-xattr crud_xattr
    else
        skip crud-xattr "xattr not enabled (fsi_xattr=1 with a backend that supports it)"
    fi
    step crud-unlink crud_unlink
}
